#!/usr/bin/env python3
"""A client of the HiveMind REST gateway that talks the way the legacy Python client does.

The legacy client zips a PEFT adapter dir with ``shutil.make_archive`` and posts it with httpx as
multipart (fields ``file``, ``user_id``, ``base_model``, ``training_samples``, ``epochs``), lists
uploads, asks for an aggregation and downloads the latest aggregated adapter under the name the
server gives in ``Content-Disposition``. This script does exactly that against a running
``hive-node serve`` and checks every status code and JSON shape on the way:

    GET  /api/v1/status
    POST /api/v1/adapter/upload          once per --adapter-dir/--user-id pair
    GET  /api/v1/adapter/list            and ?user_id=<each user>
    POST /api/v1/aggregate               (needs two users' adapters pending)
    GET  /api/v1/adapter/download/latest saved into --out-dir
    GET  /api/v1/status

It prints one JSON summary line on stdout (statuses, adapter ids, version, downloaded path, byte
count, sha256) and exits 1 on any unexpected status or shape (the reason goes to stderr).

Example:
    python3 tools/gateway/legacy_client.py --server http://127.0.0.1:8000 \
        --adapter-dir ./alice_adapter --user-id alice \
        --adapter-dir ./bob_adapter --user-id bob --out-dir ./downloads

Requirements: tools/gateway/requirements.txt (httpx).
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time

import httpx

STATUS_KEYS = {"total_adapters", "total_users", "latest_aggregated_version", "pending_for_aggregation"}
UPLOAD_KEYS = {"success", "adapter_id", "message"}
LIST_ENTRY_KEYS = {"id", "user_id", "path", "metadata"}
METADATA_KEYS = {"user_id", "base_model", "version", "uploaded_at", "training_samples", "epochs"}
AGGREGATE_KEYS = {"success", "version", "num_adapters", "message"}
# "<user>_<YYYYmmdd_HHMMSS>", with "_<n>" when one user uploads twice in the same second.
ID_SUFFIX = re.compile(r"_\d{8}_\d{6}(_\d+)?")


class Unexpected(Exception):
    """The server answered with a status or a shape the legacy client does not expect."""


def expect(cond, what):
    if not cond:
        raise Unexpected(what)


def expect_json(resp, status, keys, what):
    """Checks the status code and that the body is a JSON object with at least `keys`."""
    expect(resp.status_code == status, f"{what}: HTTP {resp.status_code}, want {status}: {resp.text[:500]}")
    try:
        body = resp.json()
    except ValueError as e:
        raise Unexpected(f"{what}: not JSON ({e}): {resp.text[:200]!r}") from e
    expect(isinstance(body, dict), f"{what}: not a JSON object: {body!r}")
    missing = keys - body.keys()
    expect(not missing, f"{what}: missing keys {sorted(missing)} in {body}")
    return body


def check_status(body):
    for key in ("total_adapters", "total_users", "pending_for_aggregation"):
        expect(isinstance(body[key], int) and body[key] >= 0, f"status.{key} is not a count: {body}")
    latest = body["latest_aggregated_version"]
    expect(latest is None or isinstance(latest, str), f"status.latest_aggregated_version: {latest!r}")
    return body


def filename_from_disposition(header):
    """The file name of `Content-Disposition: attachment; filename="..."`, without any directory."""
    m = re.search(r'filename\*?=(?:UTF-8\'\')?"?([^";]+)"?', header or "")
    expect(m is not None, f"download: no filename in Content-Disposition {header!r}")
    name = os.path.basename(m.group(1).strip())
    expect(name not in ("", ".", ".."), f"download: unusable filename {m.group(1)!r}")
    return name


class LegacyClient:
    """The legacy client's calls, one method per endpoint."""

    def __init__(self, server, timeout):
        self.server = server.rstrip("/")
        self.http = httpx.Client(base_url=self.server, timeout=timeout)
        self.statuses = []

    def _call(self, method, path, **kw):
        resp = self.http.request(method, path, **kw)
        self.statuses.append({"call": f"{method} {path}", "status": resp.status_code})
        return resp

    def status(self):
        return check_status(expect_json(self._call("GET", "/api/v1/status"), 200, STATUS_KEYS, "status"))

    def upload(self, adapter_dir, user_id, base_model, training_samples, epochs, work):
        # As the legacy client: zip the adapter dir (files at the archive's root), post the zip.
        expect(os.path.isdir(adapter_dir), f"{adapter_dir} is not a directory")
        name = os.path.basename(os.path.normpath(adapter_dir)) or "adapter"
        archive = shutil.make_archive(os.path.join(work, f"{user_id}_{name}"), "zip", root_dir=adapter_dir)
        with open(archive, "rb") as f:
            files = {"file": (os.path.basename(archive), f, "application/zip")}
            data = {
                "user_id": user_id,
                "base_model": base_model,
                "training_samples": str(training_samples),
                "epochs": str(epochs),
            }
            resp = self._call("POST", "/api/v1/adapter/upload", files=files, data=data)
        body = expect_json(resp, 200, UPLOAD_KEYS, f"upload {user_id}")
        expect(body["success"] is True, f"upload {user_id}: success is {body['success']!r}")
        adapter_id = body["adapter_id"]
        expect(
            isinstance(adapter_id, str)
            and adapter_id.startswith(f"{user_id}_")
            and ID_SUFFIX.fullmatch(adapter_id[len(user_id):]) is not None,
            f"upload {user_id}: adapter_id {adapter_id!r} is not <user>_<YYYYmmdd_HHMMSS>",
        )
        return adapter_id

    def list(self, user_id=None):
        params = {"user_id": user_id} if user_id is not None else None
        body = expect_json(self._call("GET", "/api/v1/adapter/list", params=params), 200, {"adapters"}, "list")
        adapters = body["adapters"]
        expect(isinstance(adapters, list), f"list: adapters is not a list: {adapters!r}")
        for a in adapters:
            expect(isinstance(a, dict) and LIST_ENTRY_KEYS <= a.keys(), f"list: bad entry {a!r}")
            meta = a["metadata"]
            expect(isinstance(meta, dict) and METADATA_KEYS <= meta.keys(), f"list: bad metadata {meta!r}")
            expect(meta["user_id"] == a["user_id"], f"list: metadata.user_id differs in {a!r}")
            if user_id is not None:
                expect(a["user_id"] == user_id, f"list?user_id={user_id}: entry of {a['user_id']!r}")
        return adapters

    def aggregate(self):
        body = expect_json(self._call("POST", "/api/v1/aggregate"), 200, AGGREGATE_KEYS, "aggregate")
        expect(body["success"] is True, f"aggregate: success is {body['success']!r}")
        expect(isinstance(body["version"], str) and body["version"], f"aggregate: version {body['version']!r}")
        expect(isinstance(body["num_adapters"], int), f"aggregate: num_adapters {body['num_adapters']!r}")
        return body

    def download_latest(self, out_dir):
        resp = self._call("GET", "/api/v1/adapter/download/latest")
        expect(resp.status_code == 200, f"download: HTTP {resp.status_code}: {resp.text[:500]}")
        name = filename_from_disposition(resp.headers.get("content-disposition"))
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, name)
        with open(path, "wb") as f:
            f.write(resp.content)
        return path, resp.content


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", default="http://localhost:8000", help="gateway base URL")
    p.add_argument("--adapter-dir", action="append", required=True,
                   help="PEFT adapter dir to upload (repeat; pairs with --user-id in order)")
    p.add_argument("--user-id", action="append", required=True, help="user id of each --adapter-dir")
    p.add_argument("--base-model", default="Qwen/Qwen2-7B")
    p.add_argument("--training-samples", type=int, default=0)
    p.add_argument("--epochs", type=int, default=0)
    p.add_argument("--out-dir", default=".", help="where the downloaded round adapter is saved")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per HTTP request")
    p.add_argument("--wait-secs", type=float, default=60.0,
                   help="after aggregate, how long to wait for the round to appear in the status")
    p.add_argument("--no-aggregate", action="store_true", help="upload and list only")
    args = p.parse_args(argv)
    if len(args.adapter_dir) != len(args.user_id):
        p.error("give one --user-id per --adapter-dir")

    client = LegacyClient(args.server, args.timeout)
    summary = {"server": client.server}
    try:
        summary["status_before"] = client.status()
        with tempfile.TemporaryDirectory(prefix="hivemind-legacy-") as work:
            summary["adapter_ids"] = [
                client.upload(d, u, args.base_model, args.training_samples, args.epochs, work)
                for d, u in zip(args.adapter_dir, args.user_id)
            ]
        listed = client.list()
        listed_ids = [a["id"] for a in listed]
        for adapter_id in summary["adapter_ids"]:
            expect(listed_ids.count(adapter_id) == 1, f"list: {adapter_id} listed {listed_ids.count(adapter_id)} times")
        summary["listed"] = len(listed)
        for adapter_id, user_id in zip(summary["adapter_ids"], args.user_id):
            mine = [a["id"] for a in client.list(user_id)]
            expect(adapter_id in mine, f"list?user_id={user_id}: {adapter_id} missing from {mine}")
        if not args.no_aggregate:
            agg = client.aggregate()
            summary["version"] = agg["version"]
            summary["num_adapters"] = agg["num_adapters"]
            # The gateway answers aggregate once the round commits, or (past its own wait) with
            # the version the round will have; then the round appears in the status a bit later.
            deadline = time.monotonic() + args.wait_secs
            while client.status()["latest_aggregated_version"] != agg["version"]:
                expect(time.monotonic() < deadline, f"{agg['version']} never appeared in the status")
                time.sleep(0.5)
            path, content = client.download_latest(args.out_dir)
            expect(os.path.basename(path) == f"hivemind_{agg['version']}.safetensors",
                   f"download: file {os.path.basename(path)!r} is not the aggregated version {agg['version']!r}")
            summary["downloaded"] = os.path.abspath(path)
            summary["bytes"] = len(content)
            summary["sha256"] = hashlib.sha256(content).hexdigest()
        summary["status_after"] = client.status()
    except (Unexpected, httpx.HTTPError, OSError) as e:
        summary["statuses"] = client.statuses
        summary["error"] = f"{type(e).__name__}: {e}"
        print(f"legacy_client: {summary['error']}", file=sys.stderr)
        print(json.dumps(summary, sort_keys=True))
        return 1
    summary["statuses"] = client.statuses
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
