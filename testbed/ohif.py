"""OHIF's published build (npm ``@ohif/app``, fetched by scripts/test.sh into ``.cache/ohif``) served the
way the compose deployment serves it: the static files with a single-page fallback, the deployment's
``app-config.js`` (its DICOMweb data source is this origin's ``/dicom-web``), and that path proxied to
Orthanc's DICOMweb plugin (nginx does it in docker/ohif/default.conf.template)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from testbed.network import serving

OHIF_VERSION = "3.13.2"
OHIF_DIST = Path(__file__).parents[1] / ".cache" / "ohif" / OHIF_VERSION / "dist"

APP_CONFIG = Path(__file__).parents[1] / "docker" / "ohif" / "app-config.js"


def ohif_app(dist: Path, orthanc_http_port: int) -> Starlette:
    upstream = httpx.AsyncClient(base_url=f"http://127.0.0.1:{orthanc_http_port}", timeout=60)

    async def dicomweb(request: Request) -> Response:
        rsp = await upstream.request(request.method, request.url.path, params=request.query_params,
                                     headers={k: v for k, v in request.headers.items() if k.lower() == "accept"},
                                     content=await request.body())
        keep = {k: v for k, v in rsp.headers.items() if k.lower() in ("content-type",)}
        return Response(rsp.content, status_code=rsp.status_code, headers=keep)

    async def config(_: Request) -> Response:
        return Response(APP_CONFIG.read_text(), media_type="application/javascript")

    async def static(request: Request) -> Response:
        path = (dist / request.path_params["path"]).resolve()
        if path.is_file() and path.is_relative_to(dist.resolve()):
            return FileResponse(path)
        return FileResponse(dist / "index.html")  # the viewer's own routes (/viewer?StudyInstanceUIDs=...)

    return Starlette(routes=[Route("/app-config.js", config), Route("/dicom-web/{rest:path}", dicomweb),
                             Route("/{path:path}", static)])


@contextmanager
def serving_ohif(orthanc_http_port: int, dist: Path = OHIF_DIST) -> Iterator[str]:
    if not (dist / "index.html").is_file():
        raise RuntimeError(f"OHIF {OHIF_VERSION} missing at {dist}: scripts/test.sh fetches it (npm pack @ohif/app)")
    with serving(ohif_app(dist, orthanc_http_port)) as url:
        yield url
