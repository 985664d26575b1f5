# claude-proxy: slim Python, non-root, the console script as entrypoint.
# Build: docker build -t claude-proxy .
# Run with environment variables alone (no config file needed):
#   docker run --stop-timeout 40 -p 8080:8080 -p 9090:9090 \
#     -e CLAUDE_PROXY__UPSTREAM_URL=https://my-resource.services.ai.azure.com \
#     -e CLAUDE_PROXY__UPSTREAM_AUTH__TYPE=api_key -e CLAUDE_PROXY__UPSTREAM_AUTH__API_KEY=... \
#     -e CLAUDE_PROXY__CLIENT_API_KEY=... claude-proxy
# The image's /etc/claude-proxy/config.toml (deploy/docker/image-config.toml) listens on 0.0.0.0
# with the admin listener on 9090; CLAUDE_PROXY__* variables override it; mount your own over it.
# --stop-timeout: shutdown_timeout (30 s by default) plus a margin, or Docker kills the drain at 10 s.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    CLAUDE_PROXY_CONFIG_FILE=/etc/claude-proxy/config.toml

RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin claude-proxy

WORKDIR /src
COPY pyproject.toml README.md ./
COPY claude_proxy ./claude_proxy
# [otel]: OTLP export for [telemetry]; unused (and not imported) while it is off
RUN pip install --no-compile '.[otel]' && rm -rf /src
COPY deploy/docker/healthcheck.py /usr/local/lib/claude-proxy/healthcheck.py
# owned by the user it runs as and private to it: no "readable by others" warning at start-up
COPY --chown=10001:10001 --chmod=0600 deploy/docker/image-config.toml /etc/claude-proxy/config.toml

WORKDIR /tmp
USER 10001
EXPOSE 8080 9090

# Reads the config as claude-proxy does, so it follows [admin] port set by a variable or a file.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "/usr/local/lib/claude-proxy/healthcheck.py"]

ENTRYPOINT ["claude-proxy"]
