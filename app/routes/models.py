"""Models: upload (a zoo architecture + config, or the team's own code + factory, and the
weights), list, get, delete.

Everything is checked here, before anything is stored, without torch and without running
uploaded code: the weights' format from their first bytes, the safetensors header (or the
opcodes of a state_dict .pt's pickle, never executed), a zoo config and the weights' names and
shapes against the architecture, and the source of a code model (parsed, never imported). Code
uploads are an administrator's choice (`MIPP_ALLOW_CODE_UPLOADS`); the code runs only in a
worker's job process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Response, UploadFile
from sqlalchemy import select

from app.core.inputs import delete_unless_in_use
from app.deps import CurrentUser, OwnedModel, SessionDep, SettingsDep, StoreDep, visible
from app.errors import Forbidden, InvalidRequest, InvalidUpload
from app.core.model_checks import check_code, check_zoo_config, check_zoo_weights, choose_format
from app.models import Job, ModelFile, new_id
from app.limits import check_storage_quota
from app.routes.common import (
    AUTHENTICATED,
    MAX_NAME_CHARS,
    Limit,
    Offset,
    check_text,
    error_responses,
    page,
    parse_json_field,
    upload_tmpdir,
)
from app.schemas import MAX_CLASSES, MODEL_FORMATS, ZOO_ARCHITECTURES, ModelOut, Page
from app.storage import model_key
from app.uploads import check_safetensors, check_state_dict_pt, save_upload

router = APIRouter(prefix="/models", tags=["models"], responses=AUTHENTICATED)

CHECKS = {"safetensors": check_safetensors, "pt": check_state_dict_pt}
MAX_INPUT_DIM = 1_000_000  # per axis; an (N, 10**6) float32 batch of 1 is 4 MB
FILENAMES = {"safetensors": "weights.safetensors", "pt": "weights.pt"}
CODE_SETTING = "MIPP_ALLOW_CODE_UPLOADS"


@router.post("", response_model=ModelOut, status_code=201,
             responses=error_responses(403, 413, 422))
def upload_model(
    user: CurrentUser,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description="Weights: safetensors or a state_dict .pt")],
    arch: Annotated[str | None, Form(description=f"Zoo architecture: {', '.join(ZOO_ARCHITECTURES)}; omit with `code`")] = None,
    format: Annotated[str | None, Form(description="safetensors | pt (default: read from the file)")] = None,
    config: Annotated[str, Form(description='Architecture config JSON, e.g. {"widths": [64, 32]}')] = "{}",
    input_shape: Annotated[str | None, Form(description="Per-sample shape JSON, e.g. [64]")] = None,
    num_classes: Annotated[int | None, Form(ge=2, le=MAX_CLASSES, description="Output classes, e.g. 10")] = None,
    name: Annotated[str | None, Form(max_length=200, description="Display name (default: the file name)")] = None,
    code: Annotated[UploadFile | None, File(description="Your own architecture: a .py file or a .zip of a package (needs MIPP_ALLOW_CODE_UPLOADS)")] = None,
    factory: Annotated[str | None, Form(description="With `code`: module:function returning the nn.Module")] = None,
    kwargs: Annotated[str, Form(description='With `code`: the factory\'s keyword arguments as JSON, e.g. {"width": 16}')] = "{}",
):
    """Upload a model: the weights and a zoo architecture (or your own code). Checked
    before anything is stored; 413 above the upload limit or your storage quota."""
    if format is not None and format not in MODEL_FORMATS:
        raise InvalidUpload(
            f"format {format!r} is not accepted; use one of {', '.join(MODEL_FORMATS)} "
            "(weights as safetensors, or a state_dict saved with torch.save)"
        )
    shape = parse_json_field(input_shape, "input_shape", list, "[64] or [1, 28, 28]")
    if shape is not None and not (
        1 <= len(shape) <= 3
        and all(type(d) is int and 0 < d <= MAX_INPUT_DIM for d in shape)
    ):
        raise InvalidRequest(
            f"input_shape must be 1-3 integers in 1..{MAX_INPUT_DIM}, got {str(shape)[:100]}"
        )
    check_text(name, "name")
    if code is not None:
        if not settings.allow_code_uploads:
            raise Forbidden(
                "code uploads are off on this server (setting allow_code_uploads): an "
                f"administrator can allow them with {CODE_SETTING}=true (or `mipp serve "
                "--allow-code-uploads`); until then, upload a zoo architecture (form field arch)")
        if arch is not None:
            raise InvalidRequest("send either form field 'arch' (a zoo architecture) or 'code' "
                                 "+ 'factory' (your own), not both")
        if not factory:
            raise InvalidRequest("form field 'factory' is required with 'code', e.g. "
                                 "'mynet:build' (module:function returning the nn.Module)")
        factory_kwargs = parse_json_field(kwargs, "kwargs", dict, '{"width": 16}') or {}
        arch_config: dict = {}
    else:
        if arch is None:
            raise InvalidRequest(
                f"form field 'arch' is required: one of {', '.join(ZOO_ARCHITECTURES)}; or "
                "send your own architecture as 'code' + 'factory'")
        if arch not in ZOO_ARCHITECTURES:
            raise InvalidRequest(f"unknown arch {arch!r}; choose one of {', '.join(ZOO_ARCHITECTURES)}")
        arch_config = parse_json_field(config, "config", dict, '{"widths": [64, 32]}') or {}
        check_zoo_config(arch, arch_config)
    filename = check_text(file.filename, "filename", 1000 if name else MAX_NAME_CHARS)
    filename = filename or "weights"

    with upload_tmpdir(settings) as tmp:
        saved = save_upload(file.file, tmp / "upload", settings.max_upload_bytes, filename)
        fmt = choose_format(format, saved.path, filename)
        summary = CHECKS[fmt](saved.path, filename)
        model_id = new_id()
        key = model_key(user.id, model_id, FILENAMES[fmt])
        code_key = code_saved = None
        if code is not None:
            code_name = Path(check_text(code.filename, "code filename", MAX_NAME_CHARS)
                             or "model.py").name
            code_saved = save_upload(code.file, tmp / "code", settings.max_upload_bytes, code_name)
            summary["code"] = check_code(code_saved.path, code_name, factory)
            code_key = model_key(user.id, model_id, f"code/{code_name}")
        elif fmt == "safetensors" and shape is not None and num_classes is not None:
            check_zoo_weights(arch, arch_config, shape, num_classes, summary["tensors"],
                              where=f"{filename}",
                              fix="upload the arch, config, input_shape and num_classes the "
                                  "weights were saved from")
        check_storage_quota(session, user, settings, saved.size_bytes
                            + (code_saved.size_bytes if code_saved is not None else 0))
        row = ModelFile(
            id=model_id,
            owner_id=user.id,
            name=name or filename,
            kind="code" if code is not None else "zoo",
            arch=factory if code is not None else arch,
            arch_config=arch_config,
            code_store_key=code_key,
            factory=factory if code is not None else None,
            factory_kwargs=factory_kwargs if code is not None else None,
            input_shape=shape,
            num_classes=num_classes,
            format=fmt,
            store_key=key,
            size_bytes=saved.size_bytes,
            sha256=saved.sha256,
            summary=json.loads(json.dumps(summary)),
        )
        session.add(row)
        session.flush()
        stored = []
        try:
            store.put_file(key, saved.path)
            stored.append(key)
            if code_key is not None:
                store.put_file(code_key, code_saved.path)
                stored.append(code_key)
            session.commit()
        except Exception:
            session.rollback()
            for k in stored:
                store.delete(k)
            raise
    return row


@router.get("", response_model=Page[ModelOut], responses=error_responses(422))
def list_models(
    user: CurrentUser,
    session: SessionDep,
    limit: Limit = 50,
    offset: Offset = 0,
    include_deleted: Annotated[bool, Query(description="Also the deleted ones (kept for "
                                                       "their jobs' history).")] = False,
):
    """Your models (an admin: everyone's), newest first."""
    stmt = visible(select(ModelFile), ModelFile.owner_id, user)
    if not include_deleted:
        stmt = stmt.where(ModelFile.deleted_at.is_(None))
    items, total = page(session, stmt, ModelFile.created_at.desc(), limit, offset)
    return Page[ModelOut](items=items, total=total, limit=limit, offset=offset)


@router.get("/{model_id}", response_model=ModelOut, responses=error_responses(404, 422))
def get_model(model: OwnedModel):
    """One model; a deleted one still answers (with `deleted_at`) for its jobs' history."""
    return model


@router.delete("/{model_id}", status_code=204, responses=error_responses(404, 409, 422))
def delete_model(model: OwnedModel, session: SessionDep, store: StoreDep) -> Response:
    """Delete a model's files; its row stays (marked deleted) so its jobs stay readable.
    409 while an active job uses it."""
    code_key = model.code_store_key
    delete_unless_in_use(session, store, model, Job.model_id, "model")
    if code_key:
        store.delete(code_key)
    return Response(status_code=204)
