"""TGI routes: ``POST /generate``, ``POST /generate_stream`` and TGI's ``POST /``.

``POST /`` is TGI's compatibility route, the one its Python client and
``huggingface_hub.InferenceClient.text_generation`` call: the body's ``stream`` picks
generate_stream (events) or generate, answered as TGI does, a list of one response.
The serving code they share is ``server/tgi_serving.py``.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from ..deps import ServingDep, require_api_key
from ..openapi import BODY_ERRORS, EVENT_STREAM, error_responses, streaming_ok
from ..protocol.tgi import TGIRequest, TGIResponse
from ..sse import SSEResponse
from ..tgi_serving import generate_one, stream_response

router = APIRouter(tags=["tgi"], dependencies=[Depends(require_api_key)])
ERRORS = error_responses(*BODY_ERRORS, 401, 404, 429, 503)


@router.post("/generate", response_model=TGIResponse, responses=ERRORS)
async def generate(body: TGIRequest, request: Request, serving: ServingDep) -> Response:
    return await generate_one(serving, body, request)


@router.post(
    "/generate_stream",
    status_code=200,
    response_class=SSEResponse,
    responses={**ERRORS, 200: {"description": "One event per token", "content": EVENT_STREAM}},
)
async def generate_stream(body: TGIRequest, serving: ServingDep) -> Response:
    return await stream_response(serving, body)


@router.post(
    "/",
    response_model=list[TGIResponse],
    responses={**ERRORS, **streaming_ok("A list of one response, or events when `stream` is true")},
)
async def tgi_compat(body: TGIRequest, request: Request, serving: ServingDep) -> Response:
    """TGI's compatibility route: events when ``stream`` is true, else a list of one."""
    if body.stream:
        return await stream_response(serving, body)
    return await generate_one(serving, body, request, as_list=True)
