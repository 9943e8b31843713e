"""Check a RayService's `serveConfigV2` string with Ray's own schema, plus the unknown keys it ignores.

Contract: `check_serve_config(text, where)` -> (parsed config or None, errors). The string must be
YAML holding a mapping that `ray.serve.schema.ServeDeploySchema.model_validate` accepts. Pydantic
ignores unknown keys there (a typo such as `route_prefx` would silently do nothing), so every
mapping that Ray parses into a pydantic model (the deploy schema, each application, each deployment,
and nested option models such as `ray_actor_options`, `autoscaling_config`, `request_router_config`)
is compared against that model's fields. Free-form dicts (`args`, `runtime_env`, `user_config`) are
not descended into. Ray is imported lazily (about a second).
"""
from __future__ import annotations

import typing
from typing import Any, Optional

import yaml


def _models_in(annotation: Any) -> list[type]:
    """The pydantic model classes mentioned in a field annotation (Optional/Union/List/Annotated)."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type] = []
    for arg in typing.get_args(annotation):
        found += _models_in(arg)
    return found


def unknown_keys(data: dict, model: type, where: str) -> list[str]:
    """Keys of `data` (recursively) that `model` does not declare."""
    fields = model.model_fields
    known = set(fields) | {f.alias for f in fields.values() if f.alias}
    errors = []
    for key, value in data.items():
        if key not in known:
            errors.append(f"{where}/{key}: unknown field for Ray's {model.__name__} (Ray would ignore it)")
            continue
        models = _models_in(fields[key].annotation) if key in fields else []
        if len(models) != 1:
            continue
        if isinstance(value, dict):
            errors += unknown_keys(value, models[0], f"{where}/{key}")
        elif isinstance(value, list):
            errors += [e for i, item in enumerate(value) if isinstance(item, dict)
                       for e in unknown_keys(item, models[0], f"{where}/{key}/{i}")]
    return errors


def check_serve_config(text: Any, where: str = "/spec/serveConfigV2") -> tuple[Optional[dict], list[str]]:
    if not isinstance(text, str):
        return None, [f"{where}: must be a string holding YAML (use a `|` block scalar)"]
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as e:
        return None, [f"{where}: not valid YAML: {e}"]
    if not isinstance(config, dict):
        return None, [f"{where}: must hold a YAML mapping with `applications:`"]
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    errors = []
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as e:
        errors = [f"{where}/{'/'.join(map(str, err['loc']))}: {err['msg']} (ServeDeploySchema)"
                  for err in e.errors()]
    return config, errors + unknown_keys(config, ServeDeploySchema, where)


def actor_gpus(config: dict) -> list[tuple[str, float]]:
    """(app/deployment, num_gpus) for every deployment override that sets ray_actor_options.num_gpus."""
    out = []
    for app in config.get("applications") or []:
        for dep in app.get("deployments") or []:
            gpus = (dep.get("ray_actor_options") or {}).get("num_gpus")
            if gpus is not None:
                out.append((f"{app.get('name')}/{dep.get('name')}", float(gpus)))
    return out


def http_port(config: dict) -> int:
    """The Serve HTTP port the config asks for (Ray's default is 8000)."""
    return int((config.get("http_options") or {}).get("port", 8000))
