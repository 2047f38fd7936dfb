# One image for the mock LLM backend and the NTONIX gateway (both come with the project).
# Build from the repository root:  docker build -f mocks/Dockerfile -t ntonix-mocks .
FROM python:3.11-slim

COPY pyproject.toml README.md /src/
COPY src /src/src
COPY mocks /src/mocks
RUN pip install --no-cache-dir /src && rm -rf /src

# Out of the source tree, so the installed packages are the ones imported.
WORKDIR /app
USER nobody
EXPOSE 8001
# The mock exits 0 on SIGTERM, so `docker stop` is quick and clean.
ENTRYPOINT ["python", "-m", "mocks.llm"]
CMD ["--host", "0.0.0.0", "--port", "8001"]
