"""POST /v1/adapters/merge (admin): a new adapter made from LoRA adapters by PEFT's own add_weighted_adapter.

{"name": "m", "method": "ties", "sources": [{"name": "a", "weight": 0.6}, {"name": "b", "weight": 0.4}],
 "density": 0.5, "majority_sign_method": "total", "seed": 0, "svd_rank": null, "svd_clamp": null,
 "pinned": false, "replace": false}
-> 201 {the adapter's info, as POST /v1/adapters, and "merge": the parameters PEFT was given (with the seed drawn
   when a DARE merge gave none)}
 | 400 a parameter the method does not take, or one it needs missing; a source that is not LoRA/rsLoRA; what PEFT
       refuses (e.g. different ranks for linear/ties/dare/magnitude_prune), with PEFT's reason
 | 404 an unknown source, named | 409 the name exists (set "replace": true)

methods: linear, cat, svd, ties, ties_svd, dare_linear, dare_ties, dare_linear_svd, dare_ties_svd, magnitude_prune,
magnitude_prune_svd (PEFT's combination_type). density (0 < d <= 1): the *ties*, *dare*, *magnitude_prune* methods
need it. majority_sign_method ("total" | "frequency"): the ties methods. seed: the dare methods (PEFT draws DARE's
masks from torch's CPU generator; torch.manual_seed(seed) before PEFT's own call gives the same adapter).
svd_rank, svd_clamp: the *svd methods.

The merge runs on its own thread, off the event loop and the step loop, over a skeleton of the base model whose
weights take no memory (server.adapters.merge): no second copy of the base is loaded. The result is saved in PEFT's
format under <--adapters-cache>/merged/<name>/ and loaded through the adapter store like any adapter (content
hash, --max-cpu-lora-bytes). Note PEFT's quirk: the merged config copies use_rslora (and the rest) from the first
source, with lora_alpha = r, so a merge listing an rsLoRA source first is scaled by sqrt(r); list a plain LoRA
first for the weighted sum.
"""
from __future__ import annotations

import math
import secrets
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import Field, StringConstraints, model_validator

from server.adapters.merge_spec import DENSITY_METHODS, METHODS, RANDOM_METHODS, SIGN_METHODS, SVD_METHODS, MergeSpec
from server.api.admin import check_name, exists
from server.api.auth import require_admin
from server.api.strict import Strict, refuse
from server.engine.request import MAX_SCALE
from server.errors import AdapterExistsError

router = APIRouter(dependencies=[Depends(require_admin)])
MAX_MERGE_SOURCES = 16
Name = Annotated[str, StringConstraints(min_length=1, max_length=256)]
APPLIES = {  # parameter -> the methods that take it (PEFT ignores it elsewhere; here it is refused)
    "density": DENSITY_METHODS, "majority_sign_method": SIGN_METHODS, "seed": RANDOM_METHODS,
    "svd_rank": SVD_METHODS, "svd_clamp": SVD_METHODS}


class MergeSourceItem(Strict):
    name: Name
    weight: float = 1.0  # may be negative


class MergeRequest(Strict):
    name: Name
    method: Literal[METHODS]
    sources: Annotated[list[MergeSourceItem], Field(min_length=1, max_length=MAX_MERGE_SOURCES)]
    density: float | None = Field(None, gt=0.0, le=1.0)
    majority_sign_method: Literal["total", "frequency"] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    svd_rank: int | None = Field(None, ge=1, le=4096)
    svd_clamp: float | None = Field(None, gt=0.0, le=1.0)
    pinned: bool = False
    replace: bool = False

    @model_validator(mode="after")
    def _consistent(self):
        for field, methods in APPLIES.items():
            if getattr(self, field) is not None and self.method not in methods:
                raise refuse(self, field, f"{field} applies to {', '.join(methods)}, not {self.method}; omit it")
        if self.method in DENSITY_METHODS and self.density is None:
            raise refuse(self, "density", f"{self.method} needs density (0 < density <= 1: the share of each "
                         "delta kept)")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise refuse(self, "sources", "a source is named twice; give each once, with its total weight")
        if len(self.sources) == 1 and self.method not in ("linear", "cat"):  # PEFT runs any one-source merge as linear
            raise refuse(self, "method", f"{self.method} combines several adapters; with one source PEFT merges it "
                         "linearly (its other parameters unread): use method 'linear'")
        for source in self.sources:
            if not math.isfinite(source.weight) or abs(source.weight) > MAX_SCALE:
                raise refuse(self, "sources", f"source {source.name!r}: weight {source.weight} must be finite and "
                             f"within +-{MAX_SCALE:g}")
        return self

    def spec(self) -> MergeSpec:
        """The merge PEFT is asked for; a DARE merge without a seed gets a random one (reported back)."""
        seed = secrets.randbelow(2**63) if self.seed is None and self.method in RANDOM_METHODS else self.seed
        return MergeSpec(self.name, self.method, tuple((s.name, s.weight) for s in self.sources), self.density,
                         self.majority_sign_method, seed, self.svd_rank, self.svd_clamp)


@router.post("/v1/adapters/merge", status_code=201)
async def merge_adapters(body: MergeRequest, request: Request) -> JSONResponse:
    engine = request.app.state.engine
    check_name(engine, body.name)
    if not body.replace and any(a.get("name") == body.name for a in engine.list_adapters()):
        raise exists(body.name)
    spec = body.spec()
    try:
        info = await engine.merge_adapter(spec, pinned=body.pinned, replace=body.replace)
    except AdapterExistsError:  # another merge or load took the name while this one merged
        raise exists(body.name) from None
    merge = {k: v for k, v in vars(spec).items() if k not in ("name", "sources") and v is not None}
    merge["sources"] = [{"name": n, "weight": w} for n, w in spec.sources]
    return JSONResponse({**info, "merge": merge}, status_code=201)
