"""The caller's identity (keys are made with `mipp admin create-user`)."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import CurrentUser, SessionDep, SettingsDep
from app.limits import effective, storage_used
from app.routes.common import AUTHENTICATED
from app.schemas import UserOut

router = APIRouter(prefix="/users", tags=["users"], responses=AUTHENTICATED)


@router.get("/me", response_model=UserOut)
def me(user: CurrentUser, session: SessionDep, settings: SettingsDep):
    """Who this API key belongs to, with your storage usage and limits."""
    return UserOut(
        id=user.id, name=user.name, is_admin=user.is_admin, created_at=user.created_at,
        storage_quota_bytes=effective(user.storage_quota_bytes, settings.storage_quota_bytes),
        storage_used_bytes=storage_used(session, user.id),
        requests_per_minute=effective(user.requests_per_minute, settings.requests_per_minute),
    )
