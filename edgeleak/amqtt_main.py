"""Run the embedded amqtt broker in this process: ``python -m edgeleak.amqtt_main CONFIG.yaml``."""

from __future__ import annotations

import asyncio
import sys


def main(config_path: str) -> None:
    try:
        import yaml
        from amqtt.broker import Broker
    except ImportError:
        raise SystemExit("the embedded broker needs amqtt: pip install 'edgeleak[lab]'") from None
    with open(config_path) as f:
        config = yaml.safe_load(f)

    async def serve() -> None:
        broker = Broker(config)
        await broker.start()
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main(sys.argv[1])
