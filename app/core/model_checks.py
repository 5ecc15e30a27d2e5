"""Door checks for uploaded models, without torch and without running anything uploaded.

- `sniff_weights_format`: a torch.save zip or a safetensors file, told from the first bytes, so
  a `.pt` sent as safetensors gets "send format=pt", not a header-length riddle.
- `check_zoo_weights`: a zoo `config` that validates, and weights whose names and shapes (from
  the safetensors header) are exactly what the architecture holds (`mipp.zoo_shapes`).
- `check_code`: the team's own architecture: a `.py` or a `.zip` of a package, read as text
  and parsed with `ast` (never imported or executed here), that defines the factory.
- `check_fits`: a model and a dataset that agree on input shape and class count.

Each raises `InvalidUpload`/`InvalidRequest` naming the form field and the fix.
"""

from __future__ import annotations

import ast
import math
import zipfile
from pathlib import Path
from typing import Any

from app.core.errors import InvalidRequest, InvalidUpload
from mipp.custom import FACTORY_PATTERN, safe_members
from mipp.errors import ModelError
from mipp.zoo_shapes import expected_state_shapes, validate_config, weights_mismatch

ZIP_MAGIC = b"PK\x03\x04"


def sniff_weights_format(path: Path) -> str | None:
    """"pt" for a zip (torch.save since 1.6), "safetensors" for a plausible header, else None."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head.startswith(ZIP_MAGIC):
        return "pt"
    if len(head) >= 9:
        header_len = int.from_bytes(head[:8], "little")
        if 0 < header_len <= path.stat().st_size - 8 and head[8:9] == b"{":
            return "safetensors"
    return None


def choose_format(declared: str | None, path: Path, filename: str) -> str:
    """The weights format: the declared one when it fits the file, the sniffed one when none
    was declared; InvalidUpload naming `format` when they disagree."""
    found = sniff_weights_format(path)
    if declared is None:
        if found is None:
            raise InvalidUpload(
                f"{filename}: cannot tell the weights format (neither a torch.save zip nor a "
                "safetensors file); send form field format=safetensors or format=pt")
        return found
    if found is not None and found != declared:
        kind = "a torch.save zip archive (.pt)" if found == "pt" else "a safetensors file"
        raise InvalidUpload(
            f"{filename} is {kind}, but form field format is {declared!r}; send "
            f"format={found} (or leave format out and it is read from the file)")
    return declared


def check_zoo_config(arch: str, config: dict[str, Any]) -> None:
    try:
        validate_config(arch, config)
    except ModelError as exc:
        raise InvalidRequest(f"form field 'config': {exc}") from None


def check_zoo_weights(arch: str, config: dict[str, Any], input_shape: list[int],
                      num_classes: int, tensors: dict[str, Any], where: str,
                      fix: str) -> None:
    """InvalidRequest unless the safetensors header `tensors` ({name: {"shape": [...]}}) holds
    what `arch` with `config` holds for `input_shape` and `num_classes`."""
    try:
        expected = expected_state_shapes(arch, input_shape, num_classes, config)
    except ModelError as exc:
        raise InvalidRequest(f"{where}: {exc}") from None
    found = {name: info["shape"] for name, info in tensors.items()}
    if problem := weights_mismatch(expected, found):
        raise InvalidRequest(
            f"{where}: the weights do not match arch {arch!r} with config {config}, input_shape "
            f"{list(input_shape)} and {num_classes} classes ({problem}); {fix}")


def _defines(tree: ast.Module, name: str) -> bool:
    """Whether a module's top level binds `name` (def, class, assignment or import)."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and \
                node.name == name:
            return True
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return True
        if isinstance(node, ast.Import | ast.ImportFrom):
            if any((a.asname or a.name.split(".")[0]) == name for a in node.names):
                return True
    return False


def _parse(source: bytes, where: str) -> ast.Module:
    try:
        return ast.parse(source.decode("utf-8"), filename=where)
    except UnicodeDecodeError:
        raise InvalidUpload(f"{where} is not UTF-8 text; upload Python source") from None
    except SyntaxError as exc:
        raise InvalidUpload(f"{where} is not valid Python: line {exc.lineno}: {exc.msg}") from None


def check_code(path: Path, filename: str, factory: str) -> dict[str, Any]:
    """Check uploaded model source without importing it; returns a summary for the row.

    `.py`: its stem must be the factory's module. `.zip`: the module must be inside
    (`pkg/mod.py` or `pkg/mod/__init__.py`), with relative, regular, small files.
    """
    if not FACTORY_PATTERN.match(factory or ""):
        raise InvalidRequest(f"form field 'factory' must look like 'module:function' (e.g. "
                             f"'mynet:build'), got {factory!r}")
    module, function = factory.split(":")
    suffix = Path(filename).suffix.lower()
    if suffix == ".py":
        if Path(filename).stem != module:
            raise InvalidRequest(
                f"form field 'factory' names module {module!r} but the code file is "
                f"{filename!r}; name the file {module}.py or use factory "
                f"'{Path(filename).stem}:{function}'")
        files = {filename: path.read_bytes()}
        target = filename
    elif suffix == ".zip":
        if not zipfile.is_zipfile(path):
            raise InvalidUpload(f"{filename}: not a zip archive")
        try:
            with zipfile.ZipFile(path) as archive:
                members = safe_members(archive, filename)
                files = {m.filename: archive.read(m) for m in members if m.filename.endswith(".py")}
        except ModelError as exc:
            raise InvalidUpload(str(exc)) from None
        except (zipfile.BadZipFile, OSError) as exc:
            raise InvalidUpload(f"{filename}: corrupt zip archive ({exc})") from None
        base = module.replace(".", "/")
        target = next((c for c in (f"{base}.py", f"{base}/__init__.py") if c in files), None)
        if target is None:
            raise InvalidRequest(
                f"form field 'factory' names module {module!r}, but {filename} has neither "
                f"{base}.py nor {base}/__init__.py at its root (it has: "
                f"{', '.join(sorted(files)[:8]) or 'no .py files'})")
    else:
        raise InvalidUpload(f"code file {filename!r} must be a .py file or a .zip of a package")
    trees = {name: _parse(source, f"{filename}:{name}" if name != filename else filename)
             for name, source in files.items()}
    if not _defines(trees[target], function):
        raise InvalidRequest(f"form field 'factory': {target} defines no top-level "
                             f"{function!r}; name a function that returns the nn.Module")
    return {"files": sorted(files), "bytes": sum(len(s) for s in files.values())}


def check_fits(model, data_shape: list[int] | None, data_classes: int | None) -> None:
    """A model row and a dataset's per-sample shape and class count agree (mlp flattens, so
    any shape with as many values fits it); InvalidRequest naming the model field otherwise."""
    shape = model.input_shape
    if shape and data_shape and list(shape) != list(data_shape):
        flat_fit = model.kind == "zoo" and model.arch == "mlp" and \
            math.prod(shape) == math.prod(data_shape)
        if not flat_fit:
            raise InvalidRequest(
                f"model {model.id!r} takes input_shape {list(shape)} but the dataset has samples "
                f"of shape {list(data_shape)}; pick a dataset of that shape or upload the model "
                "with the input_shape it was built for")
    if model.num_classes and data_classes and data_classes > model.num_classes:
        raise InvalidRequest(
            f"model {model.id!r} has {model.num_classes} outputs but the dataset has "
            f"{data_classes} classes (labels up to {data_classes - 1}); use a model built "
            f"with num_classes={data_classes}")
    if model.kind == "zoo" and model.format == "safetensors" and data_shape and data_classes:
        check_zoo_weights(
            model.arch, model.arch_config or {}, list(shape or data_shape),
            model.num_classes or data_classes, (model.summary or {}).get("tensors", {}),
            where=f"model {model.id!r}",
            fix="upload the model with the input_shape and num_classes it was trained for")
