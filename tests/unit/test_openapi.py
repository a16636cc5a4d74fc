"""`docs/openapi.yaml` is a well-formed OpenAPI 3.1 document and matches the code: the same
paths and methods as the servlets, every errcode the module raises, the module's limits.

That every documented answer is really given, and every real answer documented, is checked
against a running server by tests/integration/test_hostile_input.py.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from synapse.api.errors import Codes

from synapse_xsign_uia import body, device_list_admin, resync, upload
from synapse_xsign_uia._synapse import FailureReason, NativeServlet
from synapse_xsign_uia._synapse.servlets import native_class
from synapse_xsign_uia.admin import PATTERNS as ADMIN_PATTERNS
from synapse_xsign_uia.admin import ReplacementWindowAdmin
from synapse_xsign_uia.config import Config
from tests.harness import openapi

SPEC = openapi.load_spec()
PACKAGE = Path(upload.__file__).parent
STATUS = re.compile(r"^([1-5][0-9][0-9]|[1-5]XX|default)$")
PATH_ITEM_FIELDS = {"$ref", "summary", "description", "servers", "parameters", *openapi.METHODS}
OPERATION_FIELDS = {
    "tags",
    "summary",
    "description",
    "externalDocs",
    "operationId",
    "parameters",
    "requestBody",
    "responses",
    "callbacks",
    "deprecated",
    "security",
    "servers",
}


def walk(value: Any, pointer: str = "#") -> Iterator[tuple[str, Any]]:
    yield pointer, value
    if isinstance(value, dict):
        for key, child in value.items():
            yield from walk(child, f"{pointer}/{openapi.escape_pointer(str(key))}")
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from walk(child, f"{pointer}/{index}")


def schemas() -> Iterator[tuple[str, Any]]:
    """Every schema object the document holds outside `components/schemas` (checked
    there too), by pointer."""
    for pointer, value in walk(SPEC):
        if isinstance(value, dict) and "schema" in value and not pointer.endswith("/properties"):
            yield f"{pointer}/schema", value["schema"]
    for name, schema in SPEC["components"]["schemas"].items():
        yield f"#/components/schemas/{name}", schema


def test_is_openapi_3_1() -> None:
    assert re.fullmatch(r"3\.1\.\d+", SPEC["openapi"])
    assert isinstance(SPEC["info"]["title"], str)
    assert isinstance(SPEC["info"]["version"], str)
    assert SPEC["paths"]
    operation_ids = []
    for template, item in SPEC["paths"].items():
        assert template.startswith("/"), template
        assert set(item) <= PATH_ITEM_FIELDS, template
        for method in openapi.METHODS:
            if method not in item:
                continue
            operation = item[method]
            assert set(operation) <= OPERATION_FIELDS, (template, method)
            operation_ids.append(operation["operationId"])
            assert operation["responses"], (template, method)
            for status, response in operation["responses"].items():
                assert STATUS.match(status), (template, method, status)
                assert openapi.deref(SPEC, response)["description"], (template, method, status)
    assert len(operation_ids) == len(set(operation_ids))


def test_security_schemes_exist() -> None:
    schemes = SPEC["components"]["securitySchemes"]
    for requirement in SPEC["security"]:
        assert set(requirement) <= set(schemes)
    for scheme in schemes.values():
        assert scheme["type"] in ("apiKey", "http", "mutualTLS", "oauth2", "openIdConnect")


def test_every_reference_resolves() -> None:
    references = [
        value["$ref"] for _, value in walk(SPEC) if isinstance(value, dict) and "$ref" in value
    ]
    assert references
    for reference in references:
        openapi.resolve_pointer(SPEC, reference)


@pytest.mark.parametrize(
    ("pointer", "schema"), list(schemas()), ids=lambda v: v if isinstance(v, str) else ""
)
def test_schemas_are_json_schema_2020_12(pointer: str, schema: Any) -> None:
    Draft202012Validator.check_schema(schema)


def test_path_parameters_are_declared() -> None:
    for template, item in SPEC["paths"].items():
        named = set(re.findall(r"\{(\w+)\}", template))
        for method in openapi.METHODS:
            if method not in item:
                continue
            parameters = [
                openapi.deref(SPEC, p)
                for p in item.get("parameters", []) + item[method].get("parameters", [])
            ]
            in_path = {p["name"] for p in parameters if p["in"] == "path"}
            assert in_path == named, (template, method)
            assert all(p["required"] for p in parameters if p["in"] == "path")


def test_examples_match_their_schemas() -> None:
    registry = Registry().with_resource(
        "urn:spec", Resource.from_contents(SPEC, default_specification=DRAFT202012)
    )
    checked = 0
    for pointer, value in walk(SPEC):
        if isinstance(value, dict) and "schema" in value and "example" in value:
            validator = Draft202012Validator(
                {"$ref": f"urn:spec{pointer}/schema"}, registry=registry
            )
            assert not list(validator.iter_errors(value["example"])), pointer
            checked += 1
    assert checked >= 5


def documented_methods(template: str) -> set[str]:
    return {method for method in openapi.METHODS if method in SPEC["paths"][template]}


def served_methods(names: Iterable[str]) -> set[str]:
    return {name[3:].lower() for name in names if name.startswith("on_") and name[3:].isupper()}


# What the handlers are built with is not used by the tests below.
STAND_IN: Any = SimpleNamespace(server_name="openapi.test", is_main_process=False)


def test_upload_path_and_method_match_the_servlet() -> None:
    handler = upload.UploadHandler(
        Config(), STAND_IN, cast(Any, None), cast(Any, None), cast(Any, None)
    )
    patterns = native_class(NativeServlet.UPLOAD).PATTERNS
    assert any(pattern.match(openapi.UPLOAD) for pattern in patterns)
    assert served_methods(handler.handlers) == documented_methods(openapi.UPLOAD) == {"post"}


def test_admin_path_and_methods_match_the_servlet() -> None:
    handlers = ReplacementWindowAdmin(Config(), STAND_IN, cast(Any, None), cast(Any, None)).handlers
    example = openapi.ADMIN_WINDOW.replace("{user_id}", "%40alice%3Aexample.com")
    matches = [pattern.match(example) for pattern in ADMIN_PATTERNS]
    assert any(m is not None and m["user_id"] == "%40alice%3Aexample.com" for m in matches)
    assert not any(pattern.match(example + "/x") for pattern in ADMIN_PATTERNS)
    assert served_methods(handlers) == documented_methods(openapi.ADMIN_WINDOW)
    assert documented_methods(openapi.ADMIN_WINDOW) == {"post", "get", "delete"}


def test_resync_path_and_method_match_the_resource() -> None:
    assert openapi.RESYNC == resync.RESOURCE_PATH + "/{userId}/devices"
    assert resync.route_user_segment([b"%40a%3Ab", b"devices"]) == b"%40a%3Ab"
    # The endpoint is served with `Synapse.serve_json`, which serves `on_GET` alone.
    rendered = served_methods(vars(resync.ResyncEndpoint))
    assert rendered == documented_methods(openapi.RESYNC) == {"get"}


DEVICE_LIST_ADMIN_PREFIX = "/_synapse/admin/v1/remote_device_lists/"
# A value for each path parameter of the device-list admin API, as a client sends it.
DEVICE_LIST_ADMIN_EXAMPLES = {"userId": "%40alice%3Aremote.example", "serverName": "remote.example"}


def snake_case(name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


def example_path(template: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: DEVICE_LIST_ADMIN_EXAMPLES[m[1]], template)


def test_device_list_admin_paths_and_methods_match_the_code() -> None:
    documented = {t for t in SPEC["paths"] if t.startswith(DEVICE_LIST_ADMIN_PREFIX)}
    assert documented == set(device_list_admin.PATTERNS)
    assert len(documented) == 3
    for template, (pattern, methods) in device_list_admin.PATTERNS.items():
        assert documented_methods(template) == {method.lower() for method in methods}, template
        # The code's groups are the template's parameters, named in snake case.
        parameters = re.findall(r"\{(\w+)\}", template)
        assert set(pattern.groupindex) == {snake_case(name) for name in parameters}, template
        match = pattern.match(example_path(template))
        assert match is not None, template
        for name in parameters:
            assert match[snake_case(name)] == DEVICE_LIST_ADMIN_EXAMPLES[name], template
        assert not pattern.match(example_path(template) + "/x"), template


def test_device_list_admin_paths_do_not_overlap() -> None:
    """Each documented path is served by its own pattern alone."""
    for template in device_list_admin.PATTERNS:
        path = example_path(template)
        matching = [
            t for t, (pattern, _) in device_list_admin.PATTERNS.items() if pattern.match(path)
        ]
        assert matching == [template], path


def test_every_fetch_failure_reason_of_the_status_is_documented() -> None:
    status = SPEC["components"]["schemas"]["RemoteUserDeviceList"]["properties"]
    failure = next(b for b in status["last_failed_fetch"]["oneOf"] if b["type"] == "object")
    assert {reason.value for reason in FailureReason} == set(
        failure["properties"]["reason"]["enum"]
    )


def raised_errcodes() -> set[str]:
    """Every errcode written in the module's code: "M_..." strings and `Codes.X`."""
    found: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if re.fullmatch(r"M_[A-Z_]+", node.value):
                    found.add(node.value)
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "Codes"
            ):
                code = getattr(Codes, node.attr)
                found.add(str(getattr(code, "value", code)))
    return found


def test_every_errcode_the_module_raises_is_documented() -> None:
    raised = raised_errcodes()
    assert {"M_BAD_JSON", "M_INVALID_PARAM", "M_TOO_LARGE", "M_LIMIT_EXCEEDED"} <= raised
    documented = {errcode for *_, errcode in openapi.documented_answers() if errcode}
    # The resync resource's answer to paths that are no operation, which the operation's
    # description names.
    outside_operations = {"M_UNRECOGNIZED"}
    assert "404 M_UNRECOGNIZED" in SPEC["paths"][openapi.RESYNC]["get"]["description"]
    assert raised <= documented | outside_operations, raised - documented


def test_every_resync_failure_reason_is_documented() -> None:
    documented = SPEC["components"]["schemas"]["ResyncFailure"]["properties"][resync.REASON_FIELD]
    assert {reason.value for reason in FailureReason} == set(documented["enum"])


def test_limits_match_the_code() -> None:
    description = SPEC["info"]["description"]
    assert f"larger than {body.MAX_BODY_BYTES} bytes" in description
    assert f"more than {body.MAX_DEPTH} deep" in description
    too_large = SPEC["components"]["responses"]["TooLarge"]["description"]
    assert str(body.MAX_BODY_BYTES) in too_large
