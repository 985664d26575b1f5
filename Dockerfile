# claude-proxy: slim Python, non-root, the console script as entrypoint.
# Build: docker build -t claude-proxy .
# Run:   docker run -p 8080:8080 -p 9090:9090 -v $PWD/config.toml:/etc/claude-proxy/config.toml:ro \
#          -e CLAUDE_PROXY_CLIENT_KEY=... claude-proxy
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    CLAUDE_PROXY_CONFIG_FILE=/etc/claude-proxy/config.toml

RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin claude-proxy

WORKDIR /app
COPY pyproject.toml README.md ./
COPY claude_proxy ./claude_proxy
RUN pip install --no-compile . && rm -rf /app

# The config is mounted here (a ConfigMap in Kubernetes); secrets come as environment variables
# that the config references as ${VAR}. It must set bind_address = "0.0.0.0" and an [admin] port.
VOLUME ["/etc/claude-proxy"]
USER 10001
EXPOSE 8080 9090

HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=2)"]

ENTRYPOINT ["claude-proxy"]
