"""Models: upload (zoo architecture + config + weights), list, get, delete.

Weights are checked without torch: the safetensors header, or the opcodes of a state_dict
.pt's pickle (never executed). The worker loads them (a .pt with weights_only=True).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Response, UploadFile
from sqlalchemy import select

from app.core.inputs import delete_unless_in_use
from app.deps import CurrentUser, OwnedModel, SessionDep, SettingsDep, StoreDep, visible
from app.errors import InvalidRequest, InvalidUpload
from app.models import Job, ModelFile, new_id
from app.routes.common import (
    MAX_NAME_CHARS,
    Limit,
    Offset,
    check_text,
    page,
    parse_json_field,
    upload_tmpdir,
)
from app.schemas import MAX_CLASSES, MODEL_FORMATS, ZOO_ARCHITECTURES, ModelOut, Page
from app.storage import model_key
from app.uploads import check_safetensors, check_state_dict_pt, save_upload

router = APIRouter(prefix="/models", tags=["models"])

CHECKS = {"safetensors": check_safetensors, "pt": check_state_dict_pt}
MAX_INPUT_DIM = 1_000_000  # per axis; an (N, 10**6) float32 batch of 1 is 4 MB
FILENAMES = {"safetensors": "weights.safetensors", "pt": "weights.pt"}


@router.post("", response_model=ModelOut, status_code=201)
def upload_model(
    user: CurrentUser,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description="Weights: safetensors or a state_dict .pt")],
    arch: Annotated[str, Form(description=f"Zoo architecture: {', '.join(ZOO_ARCHITECTURES)}")],
    format: Annotated[str, Form(description="safetensors | pt")] = "safetensors",
    config: Annotated[str, Form(description='Architecture config JSON, e.g. {"widths": [64, 32]}')] = "{}",
    input_shape: Annotated[str | None, Form(description="Per-sample shape JSON, e.g. [64]")] = None,
    num_classes: Annotated[int | None, Form(ge=2, le=MAX_CLASSES)] = None,
    name: Annotated[str | None, Form(max_length=200)] = None,
):
    if format not in MODEL_FORMATS:
        raise InvalidUpload(
            f"format {format!r} is not accepted; use one of {', '.join(MODEL_FORMATS)} "
            "(weights as safetensors, or a state_dict saved with torch.save)"
        )
    if arch not in ZOO_ARCHITECTURES:
        raise InvalidRequest(f"unknown arch {arch!r}; choose one of {', '.join(ZOO_ARCHITECTURES)}")
    arch_config = parse_json_field(config, "config", dict, '{"widths": [64, 32]}') or {}
    shape = parse_json_field(input_shape, "input_shape", list, "[64] or [1, 28, 28]")
    if shape is not None and not (
        1 <= len(shape) <= 3
        and all(type(d) is int and 0 < d <= MAX_INPUT_DIM for d in shape)
    ):
        raise InvalidRequest(
            f"input_shape must be 1-3 integers in 1..{MAX_INPUT_DIM}, got {str(shape)[:100]}"
        )
    check_text(name, "name")
    filename = check_text(file.filename, "filename", 1000 if name else MAX_NAME_CHARS)
    filename = filename or FILENAMES[format]

    with upload_tmpdir(settings) as tmp:
        saved = save_upload(file.file, tmp / "upload", settings.max_upload_bytes, filename)
        summary = CHECKS[format](saved.path, filename)
        model_id = new_id()
        key = model_key(user.id, model_id, FILENAMES[format])
        row = ModelFile(
            id=model_id,
            owner_id=user.id,
            name=name or filename,
            arch=arch,
            arch_config=arch_config,
            input_shape=shape,
            num_classes=num_classes,
            format=format,
            store_key=key,
            size_bytes=saved.size_bytes,
            sha256=saved.sha256,
            summary=summary,
        )
        session.add(row)
        session.flush()
        store.put_file(key, saved.path)
        try:
            session.commit()
        except Exception:
            store.delete(key)
            raise
    return row


@router.get("", response_model=Page[ModelOut])
def list_models(
    user: CurrentUser,
    session: SessionDep,
    limit: Limit = 50,
    offset: Offset = 0,
):
    stmt = visible(select(ModelFile), ModelFile.owner_id, user)
    items, total = page(session, stmt, ModelFile.created_at.desc(), limit, offset)
    return Page[ModelOut](items=items, total=total, limit=limit, offset=offset)


@router.get("/{model_id}", response_model=ModelOut)
def get_model(model: OwnedModel):
    return model


@router.delete("/{model_id}", status_code=204)
def delete_model(model: OwnedModel, session: SessionDep, store: StoreDep) -> Response:
    delete_unless_in_use(session, store, model, Job.model_id, "model")
    return Response(status_code=204)
