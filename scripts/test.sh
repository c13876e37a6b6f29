#!/usr/bin/env bash
# Install what the tests need (Debian peers, Chromium, docker-compose and promtool to validate docker/, Python
# packages), make sure PostgreSQL and Redis run on loopback, and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

need_apt=""
for tool in /usr/bin/storescu /usr/sbin/Orthanc /usr/share/orthanc/plugins/libOrthancDicomWeb.so /usr/bin/dciodvfy /usr/bin/chromium /usr/bin/docker-compose \
            /usr/bin/promtool; do
    [ -x "$tool" ] || need_apt=1
done
if [ -n "$need_apt" ]; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dcmtk orthanc orthanc-dicomweb dicom3tools chromium docker-compose >/dev/null
    # promtool, to check docker/prometheus; without its recommends (exporters that would run as services)
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
    as_root pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start || true
fi
if ! (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; then
    as_root redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no || true
fi

# OHIF's published build (npm), for the viewer test: fetched once, kept out of the repository
OHIF_VERSION=3.13.2
if [ ! -f ".cache/ohif/$OHIF_VERSION/dist/index.html" ]; then
    mkdir -p .cache/ohif
    (cd .cache/ohif && npm pack --loglevel=error "@ohif/app@$OHIF_VERSION" >/dev/null && rm -rf "$OHIF_VERSION" package \
        && tar xzf "ohif-app-$OHIF_VERSION.tgz" && mv package "$OHIF_VERSION" && rm "ohif-app-$OHIF_VERSION.tgz")
fi

scripts/install.sh model,train,test
exec .venv/bin/python -m pytest "$@"
