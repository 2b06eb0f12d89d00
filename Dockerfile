# One image for every roost service and for the host agent: `roost serve SERVICE` (deploy/compose,
# deploy/k8s), `roost agent run` (the DaemonSet), or any other `roost` command.
#   docker build -t roost:latest .
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY schemas/ schemas/
COPY services/ services/
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ROOST_DATA_DIR=/var/lib/roost \
    ROOST_HTTP_HOST=0.0.0.0 \
    ROOST_LOG_FORMAT=json
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
 && groupadd --system --gid 10001 roost \
 && useradd --system --uid 10001 --gid roost --home-dir /var/lib/roost --shell /usr/sbin/nologin roost \
 && install -d -o roost -g roost -m 0700 /var/lib/roost
# The data dir holds the secret store (0700, owned by the user running roost): mount a volume here that
# every service of the site shares (BMC password vault key, heartbeat cluster keys, subcloud sync keys).
VOLUME ["/var/lib/roost"]
USER 10001:10001
WORKDIR /var/lib/roost
# core alarms inventory heartbeat orchestrator dcsync (ROOST_HTTP_BASE_PORT + place, as under `roost up`)
EXPOSE 8470 8471 8472 8473 8474 8475
ENTRYPOINT ["roost"]
CMD ["--help"]
