"""`docs/openapi.yaml`, loaded for the tests: the documented operations, the answers each
may give, and validation of real answers against the documented schemas."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_PATH = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"
_BASE_URI = "urn:synapse-xsign-uia:openapi"
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")

UPLOAD = "/_matrix/client/v3/keys/device_signing/upload"
ADMIN_WINDOW = "/_synapse/admin/v1/users/{user_id}/_allow_cross_signing_replacement_without_uia"
RESYNC = "/_matrix/unstable/org.matrix.mscXXXX/user/{userId}/devices"
DEVICE_LIST_USER = "/_synapse/admin/v1/remote_device_lists/users/{userId}"
DEVICE_LIST_SERVER = "/_synapse/admin/v1/remote_device_lists/servers/{serverName}"
DEVICE_LIST_REPAIR = "/_synapse/admin/v1/remote_device_lists/servers/{serverName}/repair"

# (path template, method, status, errcode or None)
Answer = tuple[str, str, int, str | None]


@functools.cache
def load_spec() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8"))
    return spec


def escape_pointer(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def resolve_pointer(document: Any, ref: str) -> Any:
    """The value a local `$ref` ("#/a/b") points at."""
    if not ref.startswith("#/"):
        raise ValueError(f"not a local reference: {ref}")
    value = document
    for token in ref[2:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        value = value[token]
    return value


def deref(spec: dict[str, Any], obj: Any) -> Any:
    """An object that may be a `$ref` (responses, parameters), followed to its target."""
    while isinstance(obj, dict) and "$ref" in obj and len(obj) == 1:
        obj = resolve_pointer(spec, obj["$ref"])
    return obj


def operations(spec: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for template, item in spec["paths"].items():
        for method in METHODS:
            if method in item:
                yield template, method, item[method]


def _schema_pointer(spec: dict[str, Any], template: str, method: str, status: int) -> str | None:
    """A JSON pointer to the schema of a documented answer, or None if undocumented."""
    responses = spec["paths"][template][method]["responses"]
    key = str(status)
    if key not in responses:
        return None
    pointer = f"#/paths/{escape_pointer(template)}/{method}/responses/{key}"
    response = responses[key]
    while "$ref" in response:
        pointer = response["$ref"]
        response = resolve_pointer(spec, pointer)
    if "application/json" not in response.get("content", {}):
        return None
    return f"{pointer}/content/application~1json/schema"


@functools.cache
def _registry() -> Registry:
    resource = Resource.from_contents(load_spec(), default_specification=DRAFT202012)
    registry: Registry = Registry().with_resource(_BASE_URI, resource)
    return registry


def answer_errors(template: str, method: str, status: int, body: Any) -> list[str]:
    """Why a real answer does not match the documentation: an empty list when it does."""
    spec = load_spec()
    responses = spec["paths"][template][method]["responses"]
    if str(status) not in responses:
        return [f"{method.upper()} {template}: status {status} is not documented"]
    pointer = _schema_pointer(spec, template, method, status)
    if pointer is None:
        return []
    validator = Draft202012Validator({"$ref": f"{_BASE_URI}{pointer}"}, registry=_registry())
    return [
        f"{method.upper()} {template} {status}: {error.message} at {list(error.absolute_path)}"
        for error in validator.iter_errors(body)
    ]


def _errcodes(spec: dict[str, Any], schema: Any) -> set[str | None]:
    """The errcodes a response schema allows; None stands for an answer without one."""
    if not isinstance(schema, dict):
        return {None}
    if "anyOf" in schema or "oneOf" in schema:
        found: set[str | None] = set()
        for branch in schema.get("anyOf", []) + schema.get("oneOf", []):
            found |= _errcodes(spec, branch)
        return found
    codes: set[str | None] | None = None
    required = False
    node: Any = schema
    while isinstance(node, dict):
        errcode = node.get("properties", {}).get("errcode", {})
        if codes is None and "const" in errcode:
            codes = {errcode["const"]}
        elif codes is None and "enum" in errcode:
            codes = set(errcode["enum"])
        required = required or "errcode" in node.get("required", [])
        node = resolve_pointer(spec, node["$ref"]) if "$ref" in node else None
    found = codes if codes is not None else set()
    return found if required else found | {None}


def documented_answers(
    spec: dict[str, Any] | None = None, *, deployment: str | None = None
) -> set[Answer]:
    """Every (path, method, status, errcode) the documentation says the server may give.

    An answer marked `x-deployment` is given only by that kind of deployment (delegated
    auth, say): it is left out unless `deployment` names it.
    """
    spec = spec if spec is not None else load_spec()
    answers: set[Answer] = set()
    for template, method, _ in operations(spec):
        for status, response in spec["paths"][template][method]["responses"].items():
            if response.get("x-deployment", deployment) != deployment:
                continue
            pointer = _schema_pointer(spec, template, method, int(status))
            schema = resolve_pointer(spec, pointer) if pointer is not None else None
            for errcode in _errcodes(spec, schema):
                answers.add((template, method, int(status), errcode))
    return answers


def template_regex(template: str) -> re.Pattern[str]:
    """Matches a raw (still percent-encoded) request path against a path template, as
    Synapse's routing does: a parameter is one non-empty path segment."""
    pattern = ""
    for literal, name in re.findall(r"([^{]*)(?:\{(\w+)\})?", template):
        pattern += re.escape(literal)
        if name:
            pattern += f"(?P<{name}>[^/]+)"
    return re.compile(f"^{pattern}$")
