"""A loopback SODB API answering pysodb's real endpoints (/info, /download/<ds>/<exp>)."""
from __future__ import annotations

import json
from pathlib import Path

from fakes.http import FileServer


def h5ad_bytes(shared: Path) -> bytes:
    """A real h5ad: squidpy's processed mouse brain test data (the only real h5ad fixture)."""
    return (shared / "visium" / "mouse_brain_processed" / "test_data.h5ad").read_bytes()


class FakeSODB:
    def __init__(self, server: FileServer, experiments: dict[tuple[str, str], bytes]):
        self.server, self.experiments = server, experiments
        server.route("/pysodb/info", self._info)
        for (ds, ex), data in experiments.items():
            server.add(f"/pysodb/download/{ds}/{ex}", data)

    @property
    def base(self) -> str:
        return self.server.url + "/pysodb"

    def _info(self, handler, path, query):
        data = [["Spatial Transcriptomics", ds, ex] for ds, ex in self.experiments]
        return 200, {"Content-Type": "application/json"}, json.dumps({"code": 0, "data": data}).encode()
