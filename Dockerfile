# One image for every choreo process; docker-compose.yml picks the process per
# container with `command` (`python -m services.<name>` or `choreo ...`).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

RUN groupadd --system --gid 10001 choreo \
    && useradd --system --uid 10001 --gid choreo --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin choreo \
    && install -d -o choreo -g choreo /app

WORKDIR /app

# Dependencies first (pinned in pyproject.toml), so editing the code does not
# reinstall them.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY schemas/ schemas/
COPY services/ services/
RUN pip install --no-cache-dir . \
    && rm -rf build ./*.egg-info

# The code stays root-owned and read-only; /app itself is writable so a service
# can keep local state (e.g. a stream processor's data directory) next to it.
USER choreo

EXPOSE 8000 8080
CMD ["choreo", "--help"]
