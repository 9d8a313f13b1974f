"""The REST reference (docs/rest.md), generated from the app's OpenAPI schema, so the
document and the server cannot disagree: `python -m agentos.api.reference > docs/rest.md`;
a test checks the committed file equals what this prints."""

from __future__ import annotations

import sys

_HEAD = """# REST reference

Generated from the server's OpenAPI schema by `python -m agentos.api.reference` (a test
checks it is current; the live schema is at `/openapi.json` and `/docs`). Bodies are
JSON, or msgpack with `Content-Type: application/msgpack`; answers are msgpack with
`Accept: application/msgpack`. Every error is `{"error": {"type", "message", "code"}}`.
Calls under `/v1/` need `Authorization: Bearer <key>` when the server has keys.
"""


def render(spec: dict) -> str:
    schemas = spec.get("components", {}).get("schemas", {})
    out = [_HEAD]
    by_tag: dict[str, list[tuple[str, str, dict]]] = {}
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            by_tag.setdefault((op.get("tags") or ["other"])[0], []).append((path, method, op))
    for tag in sorted(by_tag):
        out.append(f"## {tag}\n")
        for path, method, op in by_tag[tag]:
            out.append(f"### `{method.upper()} {path}`\n")
            text = (op.get("description") or op.get("summary") or "").strip()
            if text:
                out.append(" ".join(text.split()) + "\n")
            params = [p for p in op.get("parameters", []) if p.get("in") == "query"]
            if params:
                out.append("Query: " + ", ".join(
                    f"`{p['name']}` ({_type(p.get('schema', {}), schemas)})" for p in params) + "\n")
            body = op.get("requestBody", {}).get("content", {})
            for media, content in body.items():
                out.append(_fields(f"Body ({media})", content.get("schema", {}), schemas))
            ok = {code: r for code, r in op.get("responses", {}).items() if code.startswith("2")}
            for code, r in ok.items():
                media = r.get("content", {})
                schema = next((c.get("schema") for c in media.values() if c.get("schema")), None)
                kinds = ", ".join(media) or "no body"
                if schema is not None and "$ref" in schema:
                    out.append(f"Returns {code} `{_name(schema['$ref'])}` ({kinds}).\n")
                else:
                    out.append(f"Returns {code} ({kinds}).\n")
            errors = sorted(c for c in op.get("responses", {}) if not c.startswith("2"))
            if errors:
                out.append("Errors: " + ", ".join(errors) + ".\n")
    out.append("## Schemas\n")
    for name in sorted(schemas):
        out.append(_fields(f"`{name}`", {"$ref": f"#/components/schemas/{name}"}, schemas))
    return "\n".join(out)


def _name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _resolve(schema: dict, schemas: dict) -> dict:
    while "$ref" in schema:
        schema = schemas[_name(schema["$ref"])]
    return schema


def _type(schema: dict, schemas: dict) -> str:
    if "$ref" in schema:
        return _name(schema["$ref"])
    if "anyOf" in schema:
        return " or ".join(_type(s, schemas) for s in schema["anyOf"])
    if schema.get("type") == "array":
        return f"list of {_type(schema.get('items', {}), schemas)}"
    if "const" in schema:
        return repr(schema["const"])
    if "enum" in schema:
        return " | ".join(repr(v) for v in schema["enum"])
    if schema.get("format") == "binary":
        return "binary"
    return schema.get("type", "any")


def _fields(title: str, schema: dict, schemas: dict) -> str:
    s = _resolve(schema, schemas)
    props = s.get("properties")
    if not props:
        return f"{title}: {_type(schema, schemas)}.\n"
    required = set(s.get("required", []))
    # a schema whose fields are described gets a fourth column for what they mean
    described = any("description" in p for p in props.values())
    rows = [f"{title}:\n", "| field | type | default |" + (" meaning |" if described else ""),
            "| --- | --- | --- |" + (" --- |" if described else "")]
    for name, p in props.items():
        default = "required" if name in required else repr(p.get("default")) if "default" in p else ""
        meaning = f" {' '.join(p.get('description', '').split())} |" if described else ""
        rows.append(f"| `{name}` | {_type(p, schemas)} | {default} |{meaning}")
    return "\n".join(rows) + "\n"


def main() -> int:
    from agentos.api.app import ServerSettings, create_app

    sys.stdout.write(render(create_app(ServerSettings()).openapi()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
