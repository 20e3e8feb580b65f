#!/usr/bin/env python3
"""Renders a kustomization directory as `kustomize build` would, for the
subset of kustomize that deploy/k8s uses: `resources` (files and
directories), `namespace`, `images`, and `patches` that are JSON 6902
operation lists with a `target` (kind, name, group, version).

Why it exists: the kustomize binary cannot be downloaded here, and kubectl
(which embeds kustomize) is on some machines and not installable on others.
scripts/test renders with this file everywhere and, where kubectl exists,
also with `kubectl kustomize`, and fails if the two differ. Anything outside
the subset is an error, never silently skipped, so the two cannot drift
apart without the check noticing.

    render.py DIR            multi-document YAML on stdout
"""

import copy
import os
import sys

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}
TARGET_FIELDS = {"kind", "name", "group", "version"}
# Kinds without a namespace among those a chat install could use.
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "IngressClass",
    "PersistentVolume",
    "PriorityClass",
    "StorageClass",
}


class RenderError(Exception):
    pass


def load_documents(path):
    with open(path, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    for d in docs:
        if not isinstance(d, dict) or "kind" not in d or "metadata" not in d:
            raise RenderError(f"{path}: a document that is not a Kubernetes object")
    return docs


def resource_id(obj):
    meta = obj.get("metadata", {})
    return (obj.get("apiVersion", ""), obj["kind"], meta.get("namespace", ""), meta.get("name", ""))


def build(directory):
    path = os.path.join(directory, "kustomization.yaml")
    if not os.path.exists(path):
        raise RenderError(f"{directory}: no kustomization.yaml")
    with open(path, encoding="utf-8") as f:
        k = yaml.safe_load(f) or {}
    unknown = set(k) - SUPPORTED
    if unknown:
        raise RenderError(f"{path}: fields outside the supported subset: {sorted(unknown)}")

    resources = []
    for entry in k.get("resources", []):
        target = os.path.normpath(os.path.join(directory, entry))
        if os.path.isdir(target):
            resources.extend(build(target))
        elif os.path.isfile(target):
            resources.extend(load_documents(target))
        else:
            raise RenderError(f"{path}: resource {entry!r} does not exist")
    seen = set()
    for obj in resources:
        rid = resource_id(obj)
        if rid in seen:
            raise RenderError(f"{path}: {rid} is added twice")
        seen.add(rid)

    # kustomize's order: patches, then namespace, then images.
    for i, patch in enumerate(k.get("patches", [])):
        apply_patch(resources, patch, directory, f"{path}: patches[{i}]")
    if "namespace" in k:
        for obj in resources:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = k["namespace"]
    for image in k.get("images", []):
        set_image(resources, image, path)
    return resources


def apply_patch(resources, patch, directory, where):
    extra = set(patch) - {"target", "patch", "path"}
    if extra:
        raise RenderError(f"{where}: unsupported fields {sorted(extra)}")
    if "patch" in patch:
        ops = yaml.safe_load(patch["patch"])
    elif "path" in patch:
        with open(os.path.join(directory, patch["path"]), encoding="utf-8") as f:
            ops = yaml.safe_load(f)
    else:
        raise RenderError(f"{where}: neither `patch` nor `path`")
    if not isinstance(ops, list):
        raise RenderError(f"{where}: only JSON 6902 patches (a list of operations) are supported")
    target = patch.get("target")
    if not isinstance(target, dict) or not target:
        raise RenderError(f"{where}: a JSON 6902 patch needs a `target`")
    extra = set(target) - TARGET_FIELDS
    if extra:
        raise RenderError(f"{where}: unsupported target fields {sorted(extra)}")
    matched = [obj for obj in resources if matches(obj, target)]
    if not matched:
        raise RenderError(f"{where}: the target {target} matches nothing")
    for obj in matched:
        for op in ops:
            json_patch(obj, op, f"{where} on {obj['kind']}/{obj['metadata'].get('name')}")


def matches(obj, target):
    api = obj.get("apiVersion", "")
    group, _, version = api.rpartition("/")
    checks = {
        "kind": obj["kind"],
        "name": obj["metadata"].get("name"),
        "group": group,
        "version": version,
    }
    return all(checks[field] == value for field, value in target.items())


def pointer(path, where):
    if not path.startswith("/"):
        raise RenderError(f"{where}: path {path!r} does not start with /")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def walk(doc, parts, where, path):
    """The container of the last part, and that part (an int index for lists)."""
    node = doc
    for part in parts[:-1]:
        node = child(node, part, where, path)
    last = parts[-1]
    if isinstance(node, list) and last != "-":
        last = index(node, last, where, path, allow_end=True)
    return node, last


def child(node, part, where, path):
    if isinstance(node, dict):
        if part not in node:
            raise RenderError(f"{where}: {path}: {part!r} does not exist")
        return node[part]
    if isinstance(node, list):
        return node[index(node, part, where, path)]
    raise RenderError(f"{where}: {path}: cannot descend into a scalar at {part!r}")


def index(node, part, where, path, allow_end=False):
    if not part.isdigit():
        raise RenderError(f"{where}: {path}: {part!r} is not a list index")
    i = int(part)
    if i > len(node) or (i == len(node) and not allow_end):
        raise RenderError(f"{where}: {path}: index {i} is out of range")
    return i


def json_patch(doc, op, where):
    kind = op.get("op")
    path = op.get("path", "")
    parts = pointer(path, where)
    if kind in ("add", "replace", "test") and "value" not in op:
        raise RenderError(f"{where}: {kind} {path} without a value")
    node, last = walk(doc, parts, where, path)
    if kind == "add":
        value = copy.deepcopy(op["value"])
        if isinstance(node, list):
            node.insert(len(node) if last == "-" else last, value)
        else:
            node[last] = value
    elif kind in ("replace", "remove", "test"):
        if isinstance(node, list):
            if last == "-" or last >= len(node):
                raise RenderError(f"{where}: {kind} {path}: no such element")
        elif last not in node:
            raise RenderError(f"{where}: {kind} {path}: no such field")
        if kind == "replace":
            node[last] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del node[last]
        elif node[last] != op["value"]:
            raise RenderError(f"{where}: test {path} failed: {node[last]!r}")
    else:
        raise RenderError(f"{where}: unsupported operation {kind!r}")


def split_image(image):
    """`name[:tag][@digest]` -> (name, tag, digest)."""
    digest = None
    if "@" in image:
        image, digest = image.split("@", 1)
    tag = None
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        image, tag = image[:colon], image[colon + 1 :]
    return image, tag, digest


def set_image(resources, rule, where):
    extra = set(rule) - {"name", "newName", "newTag", "digest"}
    if extra or "name" not in rule:
        raise RenderError(f"{where}: images entry {rule}: unsupported fields {sorted(extra)}")

    def visit(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    for container in value:
                        if isinstance(container, dict) and "image" in container:
                            container["image"] = rewrite(container["image"])
                else:
                    visit(value)
        elif isinstance(node, list):
            for item in node:
                visit(item)

    def rewrite(image):
        name, tag, digest = split_image(image)
        if name != rule["name"]:
            return image
        name = rule.get("newName", name)
        if "digest" in rule:
            return f"{name}@{rule['digest']}"
        if "newTag" in rule:
            return f"{name}:{rule['newTag']}"
        return name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")

    for obj in resources:
        visit(obj)


def main(argv):
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        docs = build(argv[1])
    except (RenderError, OSError, yaml.YAMLError) as e:
        print(f"render.py: {e}", file=sys.stderr)
        return 1
    yaml.safe_dump_all(docs, sys.stdout, sort_keys=True, default_flow_style=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
