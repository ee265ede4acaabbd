"""mkdocs hooks (mkdocs.yml `hooks:`): the generated configuration reference and the benchmark plots.

- `reference/configuration.md` is generated at build time from the schema (mopd_ray/config_reference.py),
  so it cannot drift from mopd_ray/config.py; there is no copy of it in docs/.
- The plots under benchmarks/results/ are served from the site at `benchmark-results/<folder>/<file>`.
  Pages link them by their path in the repository (`../../benchmarks/results/<folder>/<file>.png` from
  docs/results/), which GitHub renders as is; the rewrite below points those links at the site's copy.
"""

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

from mopd_ray.config_reference import render_markdown

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
REFERENCE_URI = "reference/configuration.md"
PLOTS_URI = "benchmark-results"
_RESULT_LINK = re.compile(r"\]\((?:\.\./)+benchmarks/results/([^)\s]+\.png)\)")


def on_files(files, config):
    files.append(File.generated(config, REFERENCE_URI, content=render_markdown()))
    for png in sorted(RESULTS.glob("*/*.png")):
        files.append(File.generated(config, f"{PLOTS_URI}/{png.relative_to(RESULTS).as_posix()}",
                                    abs_src_path=str(png)))
    return files


def on_page_markdown(markdown, page, config, files):
    here = posixpath.dirname(page.file.src_uri)
    return _RESULT_LINK.sub(lambda m: "](" + posixpath.relpath(f"{PLOTS_URI}/{m.group(1)}", here or ".") + ")",
                            markdown)
