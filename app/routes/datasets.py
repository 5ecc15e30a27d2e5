"""Datasets: upload a validated .npz or refer to a built-in by name; list, get, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Response, UploadFile
from sqlalchemy import select

from app.core.inputs import delete_unless_in_use
from app.deps import CurrentUser, OwnedDataset, SessionDep, SettingsDep, StoreDep, visible
from app.models import Dataset, Job, new_id
from app.routes.common import (
    MAX_NAME_CHARS,
    Limit,
    Offset,
    check_text,
    page,
    upload_tmpdir,
)
from app.schemas import BuiltinDatasetIn, DatasetOut, Page
from app.storage import dataset_key
from app.uploads import check_npz, save_upload

router = APIRouter(prefix="/datasets", tags=["datasets"])


@router.post("", response_model=DatasetOut, status_code=201)
def upload_dataset(
    user: CurrentUser,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description=".npz with x, y and optionally x_test, y_test")],
    name: Annotated[str | None, Form(max_length=200)] = None,
):
    check_text(name, "name")
    filename = check_text(file.filename, "filename", 1000 if name else MAX_NAME_CHARS)
    filename = filename or "data.npz"
    with upload_tmpdir(settings) as tmp:
        saved = save_upload(file.file, tmp / "upload.npz", settings.max_upload_bytes, filename)
        summary = check_npz(saved.path, filename)
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


@router.post("/builtin", response_model=DatasetOut, status_code=201)
def add_builtin_dataset(body: BuiltinDatasetIn, user: CurrentUser, session: SessionDep):
    check_text(body.display_name, "display_name")
    row = Dataset(
        owner_id=user.id,
        name=body.display_name or body.name,
        kind="builtin",
        builtin_name=body.name,
        size_bytes=0,
        summary={},
    )
    session.add(row)
    session.commit()
    return row


@router.get("", response_model=Page[DatasetOut])
def list_datasets(
    user: CurrentUser,
    session: SessionDep,
    limit: Limit = 50,
    offset: Offset = 0,
):
    stmt = visible(select(Dataset), Dataset.owner_id, user)
    items, total = page(session, stmt, Dataset.created_at.desc(), limit, offset)
    return Page[DatasetOut](items=items, total=total, limit=limit, offset=offset)


@router.get("/{dataset_id}", response_model=DatasetOut)
def get_dataset(dataset: OwnedDataset):
    return dataset


@router.delete("/{dataset_id}", status_code=204)
def delete_dataset(dataset: OwnedDataset, session: SessionDep, store: StoreDep) -> Response:
    delete_unless_in_use(session, store, dataset, Job.dataset_id, "dataset")
    return Response(status_code=204)
