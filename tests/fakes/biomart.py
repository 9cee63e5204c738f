"""Loopback Ensembl BioMart (martservice) answering pybiomart's real requests.

Requests handled, in the formats www.ensembl.org/biomart/martservice uses:
  ?type=registry                          MartRegistry XML (MartURLLocation per mart)
  ?type=datasets&mart=NAME                TSV, 9 columns per dataset ("TableSet", name, display name, ...)
  ?type=configuration&dataset=NAME        DatasetConfig XML (FilterPage/AttributePage descriptions)
  ?query=<Query ...><Dataset ...><Attribute name=.../></Dataset></Query>
                                          TSV result, header row of display names when header="1",
                                          "Query ERROR: ..." text for unknown attributes (status 200,
                                          as BioMart does)
`rows` is a DataFrame whose columns are attribute internal names; the server answers any
subset of them in the requested order (unique rows when uniqueRows="1").
"""
from __future__ import annotations

import threading
import xml.etree.ElementTree as ET
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pandas as pd

PATH = "/biomart/martservice"
DATABASE = "ensembl_mart_114"
DISPLAY = {
    "ensembl_gene_id": "Gene stable ID",
    "external_gene_name": "Gene name",
    "gene_biotype": "Gene type",
    "chromosome_name": "Chromosome/scaffold name",
    "external_synonym": "Gene Synonym",
    "description": "Gene description",
}

REGISTRY = f"""<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE MartRegistry>
<MartRegistry>
  <MartURLLocation database="{DATABASE}" default="1" displayName="Ensembl Genes 114" host="www.ensembl.org" includeDatasets="" martUser="" name="ENSEMBL_MART_ENSEMBL" path="/biomart/martservice" port="80" serverVirtualSchema="default" visible="1" />
  <MartURLLocation database="ensembl_mart_funcgen_114" default="0" displayName="Ensembl Regulation 114" host="www.ensembl.org" includeDatasets="" martUser="" name="ENSEMBL_MART_FUNCGEN" path="/biomart/martservice" port="80" serverVirtualSchema="default" visible="1" />
</MartRegistry>
"""

DATASETS = (
    "\n"
    "TableSet\tmmusculus_gene_ensembl\tMouse genes (GRCm39)\t1\tGRCm39\t200\t50000\tdefault\t2025-03-27 15:18:39\n"
    "TableSet\thsapiens_gene_ensembl\tHuman genes (GRCh38.p14)\t1\tGRCh38.p14\t200\t50000\tdefault\t2025-03-27 15:19:07\n"
)


def _default(name: str) -> str:
    return ' default="true"' if name == "ensembl_gene_id" else ""


def configuration_xml(dataset: str) -> str:
    attrs = "\n".join(
        f'          <AttributeDescription displayName="{d}" field="{k}" internalName="{k}" '
        f'key="gene_id_1020_key" tableConstraint="main"{_default(k)} />'
        for k, d in DISPLAY.items())
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE DatasetConfig>
<DatasetConfig dataset="{dataset}" datasetID="1" displayName="Human genes (GRCh38.p14)" interfaces="default" internalName="template" martUsers="default" modified="2025-03-27 15:19:07" softwareVersion="0.6" template="{dataset}" type="TableSet" visible="1">
  <FilterPage displayName="FILTERS" internalName="filters">
    <FilterGroup displayName="REGION:" internalName="filters">
      <FilterCollection displayName="Chromosome/scaffold" internalName="chromosome">
        <FilterDescription displayName="Chromosome/scaffold" displayType="list" field="name_1059" internalName="chromosome_name" key="seq_region_id_1020" legalQualifiers="=" multipleValues="1" qualifier="=" style="menu" tableConstraint="main" type="list" />
      </FilterCollection>
    </FilterGroup>
  </FilterPage>
  <AttributePage displayName="Features" internalName="feature_page" outFormats="html,txt,csv,tsv,xls">
    <AttributeGroup displayName="GENE:" internalName="gene">
      <AttributeCollection displayName="Ensembl" internalName="ensembl_attributes">
{attrs}
      </AttributeCollection>
    </AttributeGroup>
  </AttributePage>
</DatasetConfig>
"""


class FakeBiomart:
    """Run with `with FakeBiomart(rows) as fake: fake.url ...`; `fake.requests` logs query params."""

    def __init__(self, rows: pd.DataFrame, dataset: str = "hsapiens_gene_ensembl") -> None:
        self.rows = rows
        self.dataset = dataset
        self.requests: list[dict[str, str]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                parts = urlsplit(self.path)
                params = {k: v[0] for k, v in parse_qs(parts.query).items()}
                fake.requests.append(params)
                if parts.path != PATH:
                    return self._send(404, "Not Found", "text/plain")
                status, body, ctype = fake.answer(params)
                self._send(status, body, ctype)

            def _send(self, status, body, ctype):
                data = body.encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", f"{ctype}; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{PATH}"

    def answer(self, params: dict[str, str]) -> tuple[int, str, str]:
        if params.get("type") == "registry":
            return 200, REGISTRY, "text/xml"
        if params.get("type") == "datasets":
            return 200, DATASETS if params.get("mart") == "ENSEMBL_MART_ENSEMBL" else "", "text/plain"
        if params.get("type") == "configuration":
            if params.get("dataset") != self.dataset:
                return 200, "Problem retrieving configuration for dataset", "text/plain"
            return 200, configuration_xml(self.dataset), "text/xml"
        if "query" in params:
            return self._query(params["query"])
        return 400, "unknown request", "text/plain"

    def _query(self, query_xml: str) -> tuple[int, str, str]:
        root = ET.fromstring(query_xml)
        ds = root.find("Dataset")
        if ds is None or ds.get("name") != self.dataset:
            return 200, "Query ERROR: caught BioMart::Exception::Usage: Dataset not found", "text/plain"
        names = [a.get("name") for a in ds.findall("Attribute")]
        bad = [n for n in names if n not in self.rows.columns]
        if bad:
            return 200, (f"Query ERROR: caught BioMart::Exception::Usage: Attribute {bad[0]} "
                         "NOT FOUND"), "text/plain"
        out = self.rows[names]
        for f in ds.findall("Filter"):
            out = out[out[f.get("name")].astype(str).isin(f.get("value", "").split(","))]
        if root.get("uniqueRows") == "1":
            out = out.drop_duplicates()
        header = root.get("header") == "1"
        text = out.to_csv(sep="\t", index=False, header=[DISPLAY[n] for n in names] if header else False,
                          lineterminator="\n")
        return 200, text, "text/plain"

    def __enter__(self) -> "FakeBiomart":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
