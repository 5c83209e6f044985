"""edgeleak device runtime: wire contract, training backends, client-side defences.

This package runs on phones and Raspberry Pis: it imports numpy, paho-mqtt, onnxruntime and
safetensors only, never torch and never another edgeleak package.
"""

__version__ = "0.1.0"
