"""A loopback CNGB tree (ftp.cngb.org/pub/stomics layout, nginx-style index pages)."""
from __future__ import annotations

from fakes.http import FileServer


class FakeCNGB:
    """``sections``: {"STT0000001/Analysis/STSA0000001/STTS0000001": {"x.h5ad": bytes, ...}}"""

    def __init__(self, server: FileServer, sections: dict[str, dict[str, bytes]]):
        self.server = server
        for rel, files in sections.items():
            for name, data in files.items():
                server.add(f"/pub/stomics/{rel}/{name}", data)

    @property
    def base(self) -> str:
        return self.server.url + "/pub/stomics"
