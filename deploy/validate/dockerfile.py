"""The layout deploy/Dockerfile must keep, checked without a Docker engine:
a `build` stage on the Rust image running `cargo build --release --locked`
for both binaries; a `runtime` stage on Debian slim (or distroless) with CA
certificates and nothing to build with; `gateway` and `persister` targets
that copy one binary each from `build` (the gateway also the browser
client's files, with GATEWAY_WEB_DIR naming where) and run as user 10001. And the build
stage's context: copying exactly what the Dockerfile copies into an empty
directory must give a workspace cargo can load with the committed
Cargo.lock (`cargo metadata --locked --offline`), so a new workspace member
or a stale lock fails here rather than in someone's image build.

`check(root)` returns a list of problems; empty means fine.
"""

import os
import re
import shlex
import shutil
import subprocess
import tempfile
import tomllib

from dockerfile_parse import DockerfileParser

FINAL = ("gateway", "persister")
# Files an image needs beside its binary, from the context (not `build`), and
# the variable that tells the binary where they are.
STATIC = {"gateway": ("gateway/web/public", "GATEWAY_WEB_DIR")}
USER = re.compile(r"^10001(:10001)?$")
RUNTIME_BASES = ("debian:bookworm-slim", "gcr.io/distroless/cc")
TOOLCHAIN = re.compile(r"\b(cargo|rustc|rustup|gcc|g\+\+|clang|build-essential|make)\b")


def stages(path):
    """[(name, base, [instructions])] with top-level ARG defaults substituted."""
    parser = DockerfileParser(path=path)
    args = {}
    result = []
    for ins in parser.structure:
        kind, value = ins["instruction"], ins["value"]
        if kind == "COMMENT":
            continue
        if kind == "ARG" and not result:
            name, _, default = value.partition("=")
            args[name.strip()] = default.strip().strip('"')
            continue
        if kind == "FROM":
            words = value.split()
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), words[0])
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            result.append((name, base, []))
            continue
        if not result:
            raise ValueError(f"{kind} before the first FROM")
        result[-1][2].append((kind, value))
    return result


def check(root):
    path = os.path.join(root, "deploy", "Dockerfile")
    problems = []
    try:
        layout = stages(path)
    except (OSError, ValueError) as e:
        return [f"deploy/Dockerfile: {e}"]
    by_name = {name: (base, body) for name, base, body in layout}

    def need(condition, message):
        if not condition:
            problems.append(f"deploy/Dockerfile: {message}")
        return condition

    for name in ("build", "runtime") + FINAL:
        need(name in by_name, f"no stage `{name}`")
    if problems:
        return problems

    base, body = by_name["build"]
    need(base.startswith("rust:") and "bookworm" in base, f"the build stage is on {base}, want rust:*-bookworm")
    runs = " ".join(v for k, v in body if k == "RUN")
    need("cargo build --release --locked" in runs, "the build stage does not run `cargo build --release --locked`")
    for binary in FINAL:
        need(f"-p {binary}" in runs, f"the build stage does not build -p {binary}")

    base, body = by_name["runtime"]
    need(base.startswith(RUNTIME_BASES), f"the runtime stage is on {base}, want one of {RUNTIME_BASES}")
    runtime_runs = " ".join(v for k, v in body if k == "RUN")
    need("ca-certificates" in runtime_runs or "distroless" in base, "the runtime stage installs no ca-certificates")
    need(not TOOLCHAIN.search(runtime_runs), "the runtime stage installs or runs a build tool")

    for binary in FINAL:
        base, body = by_name[binary]
        need(base == "runtime", f"stage `{binary}` is on {base}, want `runtime`")
        need(not any(k == "RUN" for k, _ in body), f"stage `{binary}` runs commands (it should only copy the binary)")
        users = [v for k, v in by_name["runtime"][1] + body if k == "USER"]
        need(users and USER.match(users[-1].strip()), f"stage `{binary}` does not run as user 10001 (USER {users[-1:]})")
        copies = [v for k, v in body if k == "COPY"]
        want = [f"--from=build /out/{binary} /usr/local/bin/{binary}"]
        static = STATIC.get(binary)
        if static:
            source, variable = static
            envs = dict(v.split("=", 1) for k, v in body if k == "ENV" and "=" in v)
            place = envs.get(variable, "").strip('"')
            need(place, f"stage `{binary}` sets no {variable} for {source}")
            need(
                os.path.isfile(os.path.join(root, source, "index.html")),
                f"{source} has no index.html to copy into stage `{binary}`",
            )
            want.append(f"{source} {place}")
        need(copies == want, f"stage `{binary}` copies {copies}, want {want}")
        entry = [v for k, v in body if k == "ENTRYPOINT"]
        need(entry and entry[-1].strip() == f'["/usr/local/bin/{binary}"]', f"stage `{binary}`: ENTRYPOINT {entry}")
    need(layout[-1][0] in FINAL, "the last stage (built without --target) is not an image target")

    problems.extend(check_context(root, [v for k, v in by_name["build"][1] if k == "COPY"]))
    return problems


def check_context(root, copies):
    """Copies what the build stage copies into a scratch directory and asks
    cargo to load the workspace there with the committed lock file."""
    problems = []
    with open(os.path.join(root, "Cargo.toml"), "rb") as f:
        members = tomllib.load(f)["workspace"]["members"]
    copied = set()
    with tempfile.TemporaryDirectory(prefix="chat-dockerfile-") as scratch:
        for value in copies:
            words = shlex.split(value)
            if any(w.startswith("--") for w in words):
                problems.append(f"deploy/Dockerfile: build stage COPY with flags: {value}")
                continue
            *sources, dest = words
            for source in sources:
                src = os.path.join(root, source)
                if not os.path.exists(src):
                    problems.append(f"deploy/Dockerfile: COPY {source}: no such path")
                    continue
                copied.add(os.path.normpath(source))
                # Docker's COPY: a directory's contents go to DEST; a file
                # goes into DEST when it ends with a slash, else becomes DEST.
                if os.path.isdir(src):
                    shutil.copytree(
                        src,
                        os.path.join(scratch, dest),
                        ignore=shutil.ignore_patterns("target"),
                        dirs_exist_ok=True,
                    )
                else:
                    dst = os.path.join(scratch, dest)
                    if dest.endswith("/"):
                        dst = os.path.join(dst, os.path.basename(source))
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    shutil.copy(src, dst)
        for member in members + ["Cargo.lock", "migrations"]:
            if os.path.normpath(member) not in copied:
                problems.append(f"deploy/Dockerfile: the build stage does not copy {member} (Cargo.toml workspace)")
        if problems:
            return problems
        result = subprocess.run(
            ["cargo", "metadata", "--locked", "--offline", "--format-version", "1"],
            cwd=scratch,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            problems.append(
                "deploy/Dockerfile: cargo cannot load the workspace the build stage copies "
                f"(cargo metadata --locked --offline):\n{result.stderr.strip()}"
            )
    return problems
