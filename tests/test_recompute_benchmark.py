"""benchmarks/recompute.py: every setting measured, ratios against the default, a result file."""
from __future__ import annotations

import json
from pathlib import Path

from helpers import load_benchmark


def test_settings_times_and_memory(tmp_path: Path) -> None:
    bench = load_benchmark('recompute')
    out = tmp_path / 'recompute'
    bench.main(['--archs', 'xt', '--size', '64', '--rounds', '1', '--out', str(out)])
    data = json.loads(out.with_suffix('.json').read_text())
    rows = data['rows']
    assert [r['setting'] for r in rows] == list(bench.SETTINGS)
    assert rows[0]['time_ratio'] == 1.0 and rows[0]['memory_ratio'] == 1.0
    assert all(r['median_s'] > 0 and r['peak_rss'] > 0 for r in rows)
    text = out.with_suffix('.md').read_text()
    assert 'benchmarks/recompute.py --archs xt' in text and data['meta']['cpu_model'] in text
