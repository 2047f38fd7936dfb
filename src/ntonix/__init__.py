"""NTONIX: a streaming reverse proxy and load balancer for self-hosted LLM servers.

`ntonix:app` is the ASGI app for `hypercorn --worker-class trio ntonix:app`. It loads its config
(`NTONIX_CONFIG`, else `./ntonix.toml`, else the built-in default) when the server starts, so
importing the package has no side effects.
"""

__version__ = "0.1.0"

from ntonix.app import Gateway

app = Gateway()
