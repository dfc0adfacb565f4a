"""Admin routes: vLLM's runtime LoRA endpoints and swapserve's adapter resource.

POST /v1/load_lora_adapter   {"lora_name", "lora_path", "load_inplace"} -> 200 text "Success: ..." | 400/403 JSON
POST /v1/unload_lora_adapter {"lora_name"}                              -> 200 text "Success: ..." | 404 JSON
GET  /v1/adapters            -> {"object": "list", "data": [engine.list_adapters() entries]}
POST /v1/adapters            {"name", "source", "pinned", "replace"} -> 201 adapter info | 409 if it exists
GET  /v1/adapters/{name}     -> one adapter's info | 404 (saying why, when its on-demand load failed in the last 10 min)
DELETE /v1/adapters/{name}   -> {"id", "object": "adapter", "deleted": true} | 404
PUT  /v1/adapters/{name}     {"source", "pinned"} -> 200 adapter info: create, or reload (a new version if the content
                             differs)
DELETE /v1/adapters/{name}@{version} -> forget one older version (400 for the current one or one in the split) | 404
GET  /v1/adapters/{name}/versions -> {"object": "list", "data": [engine.adapter_versions() entries]} | 404
POST /v1/adapters/{name}/rollback {"version"} -> adapter info, the name on that version | 404 unknown version
PUT  /v1/adapters/{name}/traffic {"split": {version: weight}} -> {"name", "split"} | 400 (sum != 100, unknown version)
DELETE /v1/adapters/{name}/traffic -> {"name", "split": null}: requests go to the current version again
Every route depends on require_admin (admin key, or loopback-only without one).
"""
from __future__ import annotations

import inspect

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from server.api.auth import require_admin
from server.api.errors import ConflictError
from server.adapters.sources import HUB_ID_RE
from server.adapters.versions import split_pin
from server.api.protocol import (AdapterCreate, AdapterPut, LoadLoRARequest, RollbackRequest, TrafficRequest,
                                 UnloadLoRARequest)
from server.config import valid_adapter_name
from server.errors import AdapterError, AdapterExistsError, InvalidRequestError, SwapserveError, UnknownAdapterError

router = APIRouter(dependencies=[Depends(require_admin)])
MAX_NAME_CHARS = len("hub:") + 96 + len("/") + 96 + len("@") + 64  # the longest Hub id (sources.HUB_ID_RE)


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoRARequest, request: Request) -> PlainTextResponse:
    if not body.lora_name or not body.lora_path:
        raise InvalidRequestError("Both 'lora_name' and 'lora_path' must be provided.", "lora_name")
    engine = request.app.state.engine
    check_name(engine, body.lora_name)
    if not body.load_inplace and _exists(engine, body.lora_name):
        raise AdapterError(f"The lora adapter '{body.lora_name}' has already been loaded. If you want to load "
                           "the adapter in place, set 'load_inplace' to True.", "lora_name")
    await _load(engine, body.lora_name, body.lora_path, replace=body.load_inplace)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoRARequest, request: Request) -> PlainTextResponse:
    if not body.lora_name:
        raise InvalidRequestError("'lora_name' needs to be provided to unload a LoRA adapter.", "lora_name")
    await _unload(request.app.state.engine, body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


@router.get("/v1/adapters")
async def list_adapters(request: Request) -> dict:
    return {"object": "list", "data": request.app.state.engine.list_adapters()}


@router.post("/v1/adapters", status_code=201)
async def create_adapter(body: AdapterCreate, request: Request) -> JSONResponse:
    engine = request.app.state.engine
    check_name(engine, body.name)
    if not body.replace and _exists(engine, body.name):
        raise exists(body.name)
    try:
        info = await _load(engine, body.name, body.source, pinned=body.pinned, replace=body.replace)
    except AdapterExistsError:  # loaded by another call since the check above
        raise exists(body.name) from None
    return JSONResponse(_jsonable(info, body.name), status_code=201)


@router.put("/v1/adapters/{name}")
async def put_adapter(name: str, body: AdapterPut, request: Request) -> dict:
    engine = request.app.state.engine
    check_name(engine, name)
    return _jsonable(await _load(engine, name, body.source, pinned=body.pinned, replace=True), name)


@router.get("/v1/adapters/{name:path}/versions")
async def adapter_versions(request: Request, name: str = Path(max_length=MAX_NAME_CHARS)) -> dict:
    return {"object": "list", "data": request.app.state.engine.adapter_versions(name)}


@router.post("/v1/adapters/{name:path}/rollback")
async def rollback_adapter(body: RollbackRequest, request: Request, name: str = Path(max_length=MAX_NAME_CHARS)):
    return request.app.state.engine.rollback_adapter(name, body.version)


@router.put("/v1/adapters/{name:path}/traffic")
async def put_traffic(body: TrafficRequest, request: Request, name: str = Path(max_length=MAX_NAME_CHARS)):
    return {"name": name, "split": request.app.state.engine.set_traffic(name, body.split)}


@router.delete("/v1/adapters/{name:path}/traffic")
async def delete_traffic(request: Request, name: str = Path(max_length=MAX_NAME_CHARS)) -> dict:
    return {"name": name, "split": request.app.state.engine.set_traffic(name, None)}


@router.get("/v1/adapters/{name:path}")
async def get_adapter(request: Request, name: str = Path(max_length=MAX_NAME_CHARS)) -> dict:
    """One adapter (a Hub id, with its '/', included): a lookup by name only, nothing is resolved or loaded."""
    return request.app.state.engine.adapter_info(name)


@router.delete("/v1/adapters/{name:path}")
async def delete_adapter(request: Request, name: str = Path(max_length=MAX_NAME_CHARS)) -> dict:
    """``name`` (a Hub id, with its '/', included), or ``name@version``: only that (older) version."""
    base, version = split_pin(name)
    if version is None:
        await _unload(request.app.state.engine, name)
    else:
        await request.app.state.engine.unload_adapter(base, version)
    return {"id": name, "object": "adapter", "deleted": True}


def check_name(engine, name: str) -> None:
    """Adapter names: letters, digits, '.', '_', '-' (at most 128, no '..'), and not the base model's name."""
    if not valid_adapter_name(name):
        raise AdapterError(f"invalid adapter name {name!r}: use letters, digits, '.', '_', '-' "
                           "(at most 128 characters, starting with a letter or digit)", "name")
    if name == engine.model_name:
        raise AdapterError(f"adapter name {name!r} is the base model's served name", "name")


def exists(name: str) -> ConflictError:
    return ConflictError(f"adapter '{name}' already exists; DELETE it first or set 'replace': true", "name")


async def _load(engine, name: str, source: str, **options):
    """engine.load_adapter, with paths the OS cannot even look up (a NUL byte, a component over NAME_MAX)
    refused as the client's error rather than surfacing as a 500."""
    try:
        return await engine.load_adapter(name, source, **options)
    except SwapserveError:
        raise
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{source!r}: not a usable adapter path ({type(exc).__name__}: {exc})",
                           "lora_path") from None


async def _unload(engine, name: str) -> None:
    if not (valid_adapter_name(name) or HUB_ID_RE.match(name)):  # an on-demand Hub adapter is named by its id
        raise UnknownAdapterError(f"The lora adapter '{name}' cannot be found.", "lora_name")
    try:
        result = engine.unload_adapter(name)
        if inspect.isawaitable(result):
            await result
    except UnknownAdapterError as exc:
        raise UnknownAdapterError(f"The lora adapter '{name}' cannot be found.", "lora_name") from exc


def _exists(engine, name: str) -> bool:
    return any(a.get("name") == name for a in engine.list_adapters())


def _jsonable(info, name: str) -> dict:
    if isinstance(info, dict):
        return info
    return {"name": name, **({k: v for k, v in vars(info).items() if not k.startswith("_")} if info else {})}
