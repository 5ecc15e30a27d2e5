"""Datasets: upload a validated .npz or refer to a built-in by name; list, get, delete.

A dataset records how the engine prepares its inputs (`preprocessing`): an upload is fed as
uploaded (`none`) unless the user asks for `standardize` or gives mean/std/scale; a built-in
is standardised. A built-in whose files this server lacks is refused here, not in a worker.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Response, UploadFile
from sqlalchemy import select

from app.core.inputs import delete_unless_in_use
from app.deps import CurrentUser, OwnedDataset, SessionDep, SettingsDep, StoreDep, visible
from app.errors import InvalidRequest
from app.models import Dataset, Job, new_id
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
from app.schemas import BuiltinDatasetIn, DatasetOut, Page
from app.storage import dataset_key
from app.uploads import check_npz, save_upload
from mipp.builtin_datasets import BUILTINS, CLASS_NAMES, missing_files
from mipp.errors import DataError
from mipp.preprocessing import check_preprocessing_fits, parse_preprocessing, stored_form

router = APIRouter(prefix="/datasets", tags=["datasets"], responses=AUTHENTICATED)


@router.post("", response_model=DatasetOut, status_code=201,
             responses=error_responses(413, 422))
def upload_dataset(
    user: CurrentUser,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description=".npz with x, y and optionally x_test, y_test")],
    name: Annotated[str | None, Form(max_length=200, description="Display name (default: the file name)")] = None,
    preprocessing: Annotated[str, Form(description=PREPROCESSING_HELP)] = "none",
):
    """Upload an .npz (x, y and optionally x_test, y_test), checked before it is stored;
    413 above the upload limit or your storage quota."""
    check_text(name, "name")
    filename = check_text(file.filename, "filename", 1000 if name else MAX_NAME_CHARS)
    filename = filename or "data.npz"
    prep = _parse_preprocessing(preprocessing)
    with upload_tmpdir(settings) as tmp:
        saved = save_upload(file.file, tmp / "upload.npz", settings.max_upload_bytes, filename)
        summary = check_npz(saved.path, filename)
        if not isinstance(prep, str):
            try:
                check_preprocessing_fits(prep, tuple(summary["input_shape"]))
            except DataError as exc:
                raise InvalidRequest(f"form field {exc}") from None
        check_storage_quota(session, user, settings, saved.size_bytes)
        dataset_id = new_id()
        key = dataset_key(user.id, dataset_id)
        row = Dataset(
            id=dataset_id,
            owner_id=user.id,
            name=name or filename,
            kind="npz",
            store_key=key,
            size_bytes=saved.size_bytes,
            sha256=saved.sha256,
            summary=summary,
            preprocessing=stored_form(prep),
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


PREPROCESSING_HELP = (
    "How the engine prepares inputs: none (default: the values as uploaded, what a model "
    'trained on them expects) | standardize | {"mean": [...], "std": [...], "scale": 255}'
)


def _parse_preprocessing(text: str):
    value = text.strip()
    if value.startswith("{"):
        value = parse_json_field(value, "preprocessing", dict, '{"mean": [0.5], "std": [0.25]}')
    try:
        return parse_preprocessing(value, "form field 'preprocessing'")
    except DataError as exc:
        raise InvalidRequest(str(exc)) from None


@router.post("/builtin", response_model=DatasetOut, status_code=201,
             responses=error_responses(422))
def add_builtin_dataset(
    body: BuiltinDatasetIn, user: CurrentUser, session: SessionDep, settings: SettingsDep
):
    """Refer to a dataset the server ships (no upload); 422 when its files are missing here."""
    check_text(body.display_name, "display_name")
    if problem := missing_files(body.name, settings.datasets_dir):
        raise InvalidRequest(f"name: {problem}")
    info = BUILTINS[body.name]
    row = Dataset(
        owner_id=user.id,
        name=body.display_name or body.name,
        kind="builtin",
        builtin_name=body.name,
        size_bytes=0,
        summary={"input_shape": list(info.input_shape), "num_classes": info.num_classes,
                 "class_names": list(CLASS_NAMES.get(body.name, ())) or None},
        preprocessing={"kind": "standardize"},
    )
    session.add(row)
    session.commit()
    return row


@router.get("", response_model=Page[DatasetOut], responses=error_responses(422))
def list_datasets(
    user: CurrentUser,
    session: SessionDep,
    limit: Limit = 50,
    offset: Offset = 0,
    include_deleted: Annotated[bool, Query(description="Also the deleted ones (kept for "
                                                       "their jobs' history).")] = False,
):
    """Your datasets (an admin: everyone's), newest first."""
    stmt = visible(select(Dataset), Dataset.owner_id, user)
    if not include_deleted:
        stmt = stmt.where(Dataset.deleted_at.is_(None))
    items, total = page(session, stmt, Dataset.created_at.desc(), limit, offset)
    return Page[DatasetOut](items=items, total=total, limit=limit, offset=offset)


@router.get("/{dataset_id}", response_model=DatasetOut, responses=error_responses(404, 422))
def get_dataset(dataset: OwnedDataset):
    """One dataset; a deleted one still answers (with `deleted_at`) for its jobs' history."""
    return dataset


@router.delete("/{dataset_id}", status_code=204, responses=error_responses(404, 409, 422))
def delete_dataset(dataset: OwnedDataset, session: SessionDep, store: StoreDep) -> Response:
    """Delete a dataset's file; its row stays (marked deleted) so its jobs stay readable.
    409 while an active job uses it."""
    delete_unless_in_use(session, store, dataset, Job.dataset_id, "dataset")
    return Response(status_code=204)
