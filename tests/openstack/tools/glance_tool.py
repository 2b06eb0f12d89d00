"""Glance database operations with glance's own DB API, for roost's tests.  Runs in the openstack venv.

Usage: ``<openstack venv>/bin/python glance_tool.py COMMAND`` with a JSON object on stdin and one JSON object on
stdout; glance's own logging goes to stderr.  Exit status 0 on success; a traceback on stderr and status 1 else.

Every request carries ``connection`` (an SQLAlchemy URL, ``postgresql+psycopg2://...``).

Commands:
  create_image  {name, id?, owner?, visibility? ("shared"), status? ("active"), disk_format? ("raw"),
                container_format? ("bare"), size?, checksum?, properties? {k: v}, tags? [..], members? [project
                ids], locations? [{url, metadata?}]}: ``glance.db.sqlalchemy.api.image_create`` (the image row,
                its ``image_properties`` and ``image_locations``), then ``image_tag_set_all`` and
                ``image_member_create`` (status ``accepted``), as an admin context.  Answers the image id.
  get_image     {id}: the image as glance's DB API reads it back (properties, tags, members, locations).
"""

from __future__ import annotations

import contextlib
import json
import sys
import traceback
from typing import Any


def _configure(request: dict[str, Any]) -> Any:
    import glance.context
    from glance.db.sqlalchemy import api
    from oslo_config import cfg
    from oslo_db import options

    conf = cfg.CONF
    options.set_defaults(conf)
    conf(args=[], project="glance", default_config_files=[])     # options register on import: parse after
    conf.set_override("connection", request["connection"], group="database")
    return api, glance.context.get_admin_context()


def create_image(request: dict[str, Any]) -> dict[str, Any]:
    api, context = _configure(request)
    values: dict[str, Any] = {
        "name": request["name"],
        "status": request.get("status", "active"),
        "visibility": request.get("visibility", "shared"),
        "disk_format": request.get("disk_format", "raw"),
        "container_format": request.get("container_format", "bare"),
        "properties": dict(request.get("properties") or {}),
    }
    for key in ("id", "owner", "size", "checksum", "min_disk", "min_ram", "protected", "os_hash_algo",
                "os_hash_value", "virtual_size"):
        if key in request:
            values[key] = request[key]
    if request.get("locations"):
        values["locations"] = [{"url": loc["url"], "metadata": loc.get("metadata") or {}, "status": "active"}
                               for loc in request["locations"]]
    image = api.image_create(context, values)
    if request.get("tags"):
        api.image_tag_set_all(context, image["id"], list(request["tags"]))
    for member in request.get("members") or []:
        api.image_member_create(context, {"image_id": image["id"], "member": member, "can_share": False,
                                          "status": "accepted"})
    return {"ok": True, "id": image["id"]}


def get_image(request: dict[str, Any]) -> dict[str, Any]:
    api, context = _configure(request)
    image = api.image_get(context, request["id"])
    return {
        "ok": True,
        "id": image["id"],
        "name": image["name"],
        "status": image["status"],
        "visibility": image["visibility"],
        "owner": image["owner"],
        "properties": {p["name"]: p["value"] for p in image["properties"] if not p["deleted"]},
        "tags": sorted(api.image_tag_get_all(context, image["id"])),
        "members": sorted(m["member"] for m in api.image_member_find(context, image_id=image["id"])),
        "locations": [{"url": loc["url"], "metadata": loc["metadata"]} for loc in image["locations"]],
    }


COMMANDS = {"create_image": create_image, "get_image": get_image}


def main() -> int:
    if len(sys.argv) != 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: glance_tool.py {{{'|'.join(COMMANDS)}}} < request.json", file=sys.stderr)
        return 2
    command = sys.argv[1]
    request = json.load(sys.stdin)
    del sys.argv[1:]
    out = sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):
            answer = COMMANDS[command](request)
    except Exception:
        traceback.print_exc()
        return 1
    out.write(json.dumps(answer, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
