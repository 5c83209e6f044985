"""The truth boundary: the only modules that see a device's true images and labels.

``victim`` simulates an honest client's update from true examples (benches, tests); ``metrics``,
``leakage`` (matching and the leakage report) and ``report`` (grids of originals over their
reconstructions) score a ``Reconstruction`` against the truth. No attack imports from here
(``tests/test_attacks.py`` checks it).
"""
