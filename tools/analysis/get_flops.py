"""Parameters and FLOPs (multiply-accumulates) of a backbone, an ImageNet classifier or a config.

Examples::

    python tools/analysis/get_flops.py --classifier --arch xt t s b           # the paper's table
    python tools/analysis/get_flops.py --backbone OverLoCK --arch t --shape 512
    python tools/analysis/get_flops.py --backbone GLNet --arch 4g --classifier --depth 1
    python tools/analysis/get_flops.py --backbone SwinTransformer --shape 224   # any registered
    python tools/analysis/get_flops.py configs/detection/maskrcnn_overlock_t_1x.py --shape 800 1216

What is counted (see :mod:`mmoverlock.utils.flops`): multiply-accumulates (MACs, reported as "FLOPs"
like the papers do) of convolutions (``conv``), matrix products (``matmul``: linear layers,
attention, ContMix's affinity ``q^T k`` and ``weight_proj``) and the neighbourhood aggregation op
(``aggregation``: ``B*G*H*W*K*K*C``). Biases, normalisation and element-wise ops are not counted.
The ``MACs`` column is the sum of the three; ``paper`` is ``conv + matmul``.

Conventions that reproduce the published OverLoCK figures (ImageNet classifier, 224 x 224):

* the **re-parameterised (deploy) network**: each DilatedReparamBlock counts as one K x K depthwise
  conv (the default here; ``--train-form`` counts the training form, the K x K conv and every
  small dilated branch conv of each block on its own, ``k * k`` taps each: 5-6 % more MACs and
  3 % more parameters);
* **parameters without ``aux_head``** (the auxiliary classifier on the Overview-Net, unused at
  inference; with it the counts are 0.3-0.6 M higher, XT would be 5 % off);
* **FLOPs = conv + matmul MACs, without the aggregation op**. The authors' code computes the
  aggregation with natten's ``na2d_av``, an operator fvcore does not see; counting it adds about
  1 % (XT 2.700 G instead of 2.670 G, 3.8 % above the published 2.6 G; T, S, B stay within 3 %
  either way). The same counter gives GLNet's published figures within 1.2 % (its authors' FLOPs
  have no such op).

Measured with this script (``--classifier --arch xt t s b``, deploy, 224 x 224):

====== =========== ============ ============ ========== ============
arch   params (M)  paper (G)    MACs (G)     published  paper diff
====== =========== ============ ============ ========== ============
xt     16.45       2.670        2.700        16M 2.6G   +2.7 %
t      33.47       5.582        5.643        33M 5.5G   +1.5 %
s      56.16       9.790        9.890        56M 9.7G   +0.9 %
b      94.94       16.940       17.090       95M 16.7G  +1.4 %
====== =========== ============ ============ ========== ============

Backbones and classifiers are built on the ``meta`` device (no memory, no compute; about a second
for OverLoCK-B), configs on the CPU with random weights (their ``init_cfg`` is not applied).
Convolutions count as defined on either device (a 13x13 kernel counts 13 x 13 taps whatever route
the CPU would run it by). For a config, the network forward (``mode='tensor'``, no
post-processing) is counted; the RoI heads of a two-stage detector run on the proposals the RPN
keeps, so their share depends on the weights (``--checkpoint``), and a segmentor's auxiliary head
(training only) is not run.
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/, for _cli

import torch  # noqa: E402
from _cli import run_main  # noqa: E402
from mmengine.config import DictAction  # noqa: E402
from mmengine.logging import MMLogger  # noqa: E402

from mmoverlock.apis.analysis import (  # noqa: E402
    build_backbone,
    build_config_model,
    count_config_complexity,
    count_model_complexity,
    reparameterize_model,
)
from mmoverlock.apis.errors import UsageError  # noqa: E402
from mmoverlock.utils.flops import Complexity, format_count  # noqa: E402

#: Published (params, FLOPs) of the ImageNet classifiers at 224 x 224.
PUBLISHED = {
    'OverLoCK': {'xt': (16e6, 2.6e9), 't': (33e6, 5.5e9), 's': (56e6, 9.7e9),
                 'b': (95e6, 16.7e9)},
    'GLNet': {'stl': (30e6, 4.4e9), 'stl_paramslot': (30e6, 4.4e9), '4g': (27e6, 4.5e9),
              '9g': (60e6, 9.7e9), '16g': (106e6, 16.7e9)},
}
#: Classifier parameters left out by default (unused at inference).
CLASSIFIER_EXCLUDE = {'OverLoCK': ('aux_head.',)}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='See the module docstring for what is counted and the conventions.')
    parser.add_argument('config', nargs='?', help='an mmdet / mmseg config (whole model)')
    parser.add_argument('--backbone', default='OverLoCK',
                        help='registry name of the backbone (default OverLoCK)')
    parser.add_argument('--arch', nargs='+', default=None,
                        help='arch name(s), or a dict literal; several give one row each')
    parser.add_argument('--classifier', action='store_true',
                        help='count the ImageNet classifier (OverLoCK, GLNet) instead')
    parser.add_argument('--shape', type=int, nargs='+', default=None,
                        help='input H [W] (default 224 for backbones, 800 1216 for configs)')
    parser.add_argument('--batch-size', type=int, default=1)
    parser.add_argument('--train-form', action='store_true',
                        help='count the training form: every branch conv of each '
                             'DilatedReparamBlock (default: the re-parameterised / deploy form)')
    parser.add_argument('--exclude-params', nargs='*', default=None,
                        help="parameter-name prefixes not counted (default: 'aux_head.' for the "
                             'OverLoCK classifier, none otherwise)')
    parser.add_argument('--backbone-args', nargs='+', action=DictAction, default={},
                        help='extra backbone arguments, e.g. overview_fusion=False')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={},
                        help='override config settings (config mode)')
    parser.add_argument('--checkpoint', help='weights to load (config mode)')
    parser.add_argument('--device', default=None,
                        help="device of the counting run (default 'meta' for backbones, 'cpu' "
                             'for configs)')
    parser.add_argument('--depth', type=int, default=0,
                        help='also print a per-module breakdown down to this depth')
    parser.add_argument('--json', help='write the rows to this JSON file')
    args = parser.parse_args(argv)
    if args.shape is not None and len(args.shape) not in (1, 2):
        parser.error('--shape takes H or H W')
    return args


def _shape(shape: Optional[Sequence[int]], default: tuple[int, int]) -> tuple[int, int]:
    if not shape:
        return default
    return (shape[0], shape[0]) if len(shape) == 1 else (shape[0], shape[1])


def _parse_arch(text: str) -> Union[str, dict]:
    text = text.strip()
    if text.startswith('{'):
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError) as err:
            raise UsageError(f'--arch {text!r} is not a valid dict literal: {err}') from None
    return text


def _row(name: str, shape: tuple[int, int], form: str, result: Complexity,
         published: Optional[tuple[float, float]] = None) -> dict[str, Any]:
    row: dict[str, Any] = dict(
        model=name, input=f'{shape[0]}x{shape[1]}', form=form,
        params=result.num_params, macs=result.total(), paper=result.paper(),
        conv=result.category('conv'), matmul=result.category('matmul'),
        aggregation=result.category('aggregation'),
        excluded_params=result.excluded_params)
    if published is not None:
        row['published_params'], row['published_flops'] = published
    return row


def _count_backbone(args: argparse.Namespace, arch: Union[str, dict, None],
                    shape: tuple[int, int], device: str,
                    exclude: Sequence[str]) -> tuple[Complexity, list[str]]:
    model = build_backbone(args.backbone, arch, classifier=args.classifier, device=device,
                           **args.backbone_args)
    converted = [] if args.train_form else reparameterize_model(model)
    x = torch.randn(args.batch_size, 3, *shape, device=device)
    return count_model_complexity(model, x, train_form=args.train_form,
                                  exclude_params=exclude), converted


def count_backbones(args: argparse.Namespace) -> tuple[list[dict], list[Complexity]]:
    """One row per ``--arch`` for a backbone or classifier."""
    shape = _shape(args.shape, (224, 224))
    device = args.device or 'meta'
    archs: list[Optional[Union[str, dict]]] = (
        [_parse_arch(a) for a in args.arch] if args.arch else [None])
    exclude = args.exclude_params
    if exclude is None:
        exclude = CLASSIFIER_EXCLUDE.get(args.backbone, ()) if args.classifier else ()
    rows, results = [], []
    for arch in archs:
        start = time.perf_counter()
        try:
            result, converted = _count_backbone(args, arch, shape, device, exclude)
        except UsageError:
            raise
        except (RuntimeError, NotImplementedError) as err:
            if device != 'meta':
                raise
            MMLogger.get_current_instance().info(
                f'cannot be counted on the meta device ({str(err).splitlines()[0]}); '
                'counting on the CPU')
            result, converted = _count_backbone(args, arch, shape, 'cpu', exclude)
        form = 'deploy' if converted else ('train' if args.train_form else '-')
        label = args.backbone + ('-cls' if args.classifier else '')
        label += f' {arch}' if isinstance(arch, str) else (' (custom arch)' if arch else '')
        published = None
        if args.classifier and shape == (224, 224) and args.batch_size == 1 and \
                isinstance(arch, str):
            published = PUBLISHED.get(args.backbone, {}).get(arch.lower())
        rows.append(_row(label, shape, form, result, published))
        results.append(result)
        MMLogger.get_current_instance().info(
            f'{label}: counted in {time.perf_counter() - start:.1f} s'
            + (f' (excluded {result.excluded_params} parameters under {list(exclude)})'
               if result.excluded_params else ''))
    return rows, results


def count_config(args: argparse.Namespace) -> tuple[list[dict], list[Complexity]]:
    """One row for the whole model of ``args.config`` and one per top-level module."""
    shape = _shape(args.shape, (800, 1216))
    model, _ = build_config_model(args.config, args.cfg_options, args.checkpoint,
                                  device=args.device or 'cpu')
    converted = [] if args.train_form else reparameterize_model(model)
    form = 'deploy' if converted else ('train' if args.train_form else '-')
    start = time.perf_counter()
    result = count_config_complexity(model, shape, args.batch_size, train_form=args.train_form)
    MMLogger.get_current_instance().info(f'counted in {time.perf_counter() - start:.1f} s')
    name = Path(args.config).stem
    rows = [_row(name, shape, form, result)]
    return rows, [result]


def format_table(rows: list[dict]) -> str:
    """Markdown table of the rows (params in M, MACs in G)."""
    with_published = any('published_flops' in r for r in rows)
    header = ['model', 'input', 'form', 'params (M)', 'MACs (G)', 'conv', 'matmul',
              'aggregation', 'paper (G)']
    if with_published:
        header += ['published', 'params diff', 'paper diff', 'MACs diff']
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for r in rows:
        cells = [r['model'], r['input'], r['form'], format_count(r['params'], 'M', 2),
                 format_count(r['macs']), format_count(r['conv']), format_count(r['matmul']),
                 format_count(r['aggregation']), format_count(r['paper'])]
        if with_published:
            if 'published_flops' in r:
                pp, pf = r['published_params'], r['published_flops']
                cells += [f'{pp / 1e6:g}M / {pf / 1e9:g}G',
                          f'{100 * (r["params"] / pp - 1):+.1f}%',
                          f'{100 * (r["paper"] / pf - 1):+.1f}%',
                          f'{100 * (r["macs"] / pf - 1):+.1f}%']
            else:
                cells += [''] * 4
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def format_breakdown(result: Complexity, depth: int, title: str) -> str:
    """Per-module table down to ``depth`` levels (params in M, MACs in G)."""
    lines = [f'\n{title}', '| module | params (M) | MACs (G) | conv | matmul | aggregation |',
             '|---|---|---|---|---|---|']

    def visit(name: str, level: int) -> None:
        for child in result.children(name):
            if result.total(child) == 0 and result.params.get(child, 0) == 0:
                continue
            lines.append(f'| {"  " * level}{child} | '
                         f'{format_count(result.params.get(child, 0), "M", 3)} | '
                         f'{format_count(result.total(child))} | '
                         f'{format_count(result.category("conv", child))} | '
                         f'{format_count(result.category("matmul", child))} | '
                         f'{format_count(result.category("aggregation", child))} |')
            if level + 1 < depth:
                visit(child, level + 1)

    visit('', 0)
    return '\n'.join(lines)


def main(argv: Optional[list[str]] = None) -> list[dict]:
    args = parse_args(argv)
    if args.config:
        rows, results = count_config(args)
        depth = max(args.depth, 1)
    else:
        rows, results = count_backbones(args)
        depth = args.depth
    print(format_table(rows))
    excluded = any(r['excluded_params'] for r in rows)
    print('MACs = conv + matmul + aggregation; paper = conv + matmul (how the OverLoCK and GLNet '
          'papers count); form: deploy = re-parameterised, train = every branch counted'
          + ('; params without ' + ', '.join(args.exclude_params or ['aux_head.'])
             if excluded else ''))
    if depth:
        for row, result in zip(rows, results):
            print(format_breakdown(result, depth, f'{row["model"]} at {row["input"]}:'))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == '__main__':
    run_main(main)
