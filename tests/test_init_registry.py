"""Weights and registration (issues 13 and 16): mmengine's init_cfg semantics, the authors'
initialisation under a loaded checkpoint, checkpoint forms, the deprecated ``pretrained``
argument, GLNet's checkpoint-entry rule, broken downstream libraries, name conflicts in the
registries, and timm's ``features_only``."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import timm
import torch
from mmengine.logging import MMLogger
from mmengine.registry import Registry
from torch import nn

import mmoverlock  # noqa: F401  (registration, safe loading)
from mmoverlock import registry as mm_registry
from mmoverlock.models.backbones.glnet import (
    GLNet,
    checkpoint_state_keys,
    select_checkpoint_state,
)
from mmoverlock.models.backbones.overlock import OverLoCK
from mmoverlock.models.classifiers import (
    GLNetClassifier,
    OverLoCKClassifier,
    glnet_timm,
    overlock_timm,
)
from mmoverlock.models.classifiers.glnet_timm import _unwrap_checkpoint

REPO = Path(__file__).resolve().parents[1]
#: Small OverLoCK / GLNet archs with the released block structures (as in test_overlock.py and
#: test_glnet.py).
TINY = dict(depth=[1, 1, 1, 1], sub_depth=[2, 2], embed_dim=[16, 32, 64, 96],
            kernel_size=[9, 7, 7, 5], sub_num_heads=[2, 3], mlp_ratio=[4, 4, 4, 4],
            sub_mlp_ratio=[3, 3])
TINY_G = dict(depth=[1, 1, 2, 1], embed_dim=[32, 64, 96, 128], mlp_ratios=3,
              mixing_modes=['glmix', 'glmix', 'glmix.mha_nchw', 'mha_nchw'], layerscale=1e-4)
RESNET_ZOO = 'open-mmlab://resnet50_v1c'  # model.pretrained of stock mmseg base configs


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@contextmanager
def mm_log() -> Iterator[list[str]]:
    """Messages logged to mmengine's current logger inside the block (MMLogger instances do not
    propagate to the root logger, so pytest's caplog does not see them)."""
    logger = MMLogger.get_current_instance()
    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def imagenet_state(seed: int = 0) -> dict:
    """A state dict in the layout of the authors' ImageNet release (classifier with heads)."""
    torch.manual_seed(seed)
    return OverLoCKClassifier(TINY, num_classes=10).state_dict()


def save(path: Path, obj: object) -> str:
    torch.save(obj, path)
    return str(path)


@torch.no_grad()
def scramble(model: nn.Module) -> None:
    """Overwrite what the authors' initialisation sets (conv weights and biases, norm affines)
    with values it never produces, so a test sees whether it ran."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.weight.fill_(0.7)
            if module.bias is not None:
                module.bias.fill_(0.3)
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
            module.weight.fill_(5.0)
            module.bias.fill_(-2.0)


# ------------------------------------------------------------------------------------------------
# Issue 13.3: the authors' initialisation first, then init_cfg's initialisers, then checkpoints
# ------------------------------------------------------------------------------------------------
def test_new_parameters_keep_the_authors_init_under_an_imagenet_checkpoint(tmp_path: Path) -> None:
    state = imagenet_state()
    path = save(tmp_path / 'in1k.pth', {'model': state})
    model = OverLoCK(TINY, overview_fusion=True,
                     init_cfg=dict(type='Pretrained', checkpoint=path))
    scramble(model)
    model.init_weights()
    ours = model.state_dict()
    # The authors' _init_weights: trunc_normal_(std=0.02) for every conv. torch's a=-2, b=2 are
    # absolute bounds, i.e. 100 std here: the weights are a plain N(0, 0.02^2) sample.
    w = ours['h_proj.0.weight'].flatten().double()
    assert w.numel() == 96 * 120
    assert w.abs().max() <= 2.0
    assert abs(w.std().item() - 0.02) < 0.02 * 0.05  # ~7 standard errors of the estimate
    assert abs(w.mean().item()) < 5 * 0.02 / w.numel() ** 0.5
    kurtosis = (((w - w.mean()) / w.std()) ** 4).mean().item()
    assert 2.7 < kurtosis < 3.3  # normal (a uniform init would give 1.8)
    assert torch.equal(ours['h_proj.0.bias'], torch.zeros(120))
    # LayerScale(D3 + c, 1e-5) keeps its init value; its bias starts at zero.
    assert torch.equal(ours['h_proj.1.weight'], torch.full((120, 1, 1, 1), 1e-5))
    assert torch.equal(ours['h_proj.1.bias'], torch.zeros(120))
    for i, width in enumerate([16, 32, 88, 120, 96]):  # LN: weight 1, bias 0
        assert torch.equal(ours[f'extra_norm.{i}.weight'], torch.ones(width)), i
        assert torch.equal(ours[f'extra_norm.{i}.bias'], torch.zeros(width)), i
    for key, value in state.items():  # ... and everything in the checkpoint is loaded over it
        if not key.startswith(('head.', 'aux_head.')):
            assert torch.equal(ours[key], value), key


def test_init_cfg_initialisers_run_before_the_checkpoint(tmp_path: Path) -> None:
    state = imagenet_state()
    path = save(tmp_path / 'in1k.pth', {'model': state})
    init_cfg = [
        dict(type='Constant', layer='LayerNorm2d', val=2.0, bias=0.5),
        dict(type='Constant', layer='BatchNorm2d', val=3.0),
        dict(type='Normal', layer='Conv2d', std=0.5,
             override=dict(type='Constant', name='h_proj', val=0.25, bias=-1.0)),
        dict(type='Pretrained', checkpoint=path),
    ]
    model = OverLoCK(TINY, init_cfg=init_cfg)
    model.init_weights()
    ours = model.state_dict()
    # not in the checkpoint: the initialisers' values
    for i in range(5):
        assert torch.all(ours[f'extra_norm.{i}.weight'] == 2.0)
        assert torch.all(ours[f'extra_norm.{i}.bias'] == 0.5)
    for key in ('h_proj.0.weight', 'h_proj.1.weight'):  # override: the whole named module
        assert torch.all(ours[key] == 0.25), key
    assert torch.all(ours['h_proj.0.bias'] == -1.0)
    # in the checkpoint: loaded last, over the initialisers
    for key in ('patch_embed1.1.weight', 'patch_embed1.0.weight',
                'blocks1.0.proj.1.lk_origin.weight'):
        assert torch.equal(ours[key], state[key]), key


def test_kaiming_init_cfg_without_checkpoint() -> None:
    torch.manual_seed(0)
    model = GLNet(TINY_G, init_cfg=dict(type='Kaiming', layer='Conv2d'))
    model.init_weights()
    # mmengine's Kaiming defaults: normal, mode fan_out, relu gain -> std sqrt(2 / fan_out)
    w = model.downsample_layers[1][0].weight  # 32 -> 64, 3x3
    expected = (2 / (64 * 9)) ** 0.5
    assert abs(w.std().item() - expected) < 0.05 * expected
    assert torch.all(model.downsample_layers[1][0].bias == 0)


@pytest.mark.parametrize('init_cfg, error, match', [
    (dict(type='Bogus'), ValueError, r"unknown initialiser type 'Bogus'.*'Kaiming'"),
    (dict(type='Pretrained', checkpoint='x.pth', prefx='backbone.'), ValueError,
     r"unknown keys \['prefx'\] for Pretrained"),
    (dict(type='Pretrained'), ValueError, "Pretrained needs 'checkpoint'"),
    (dict(type='Constant', val=1, lyer='Conv2d'), ValueError, 'lyer'),
    (dict(type='Constant', val=1, layer='Conv2D'), ValueError, r"layer \['Conv2D'\] matches no"),
    (dict(type='Constant', val=1), ValueError, 'initialises nothing'),
    (dict(type='Constant', val=1, layer='Conv2d', override=dict(name='neck', type='Constant',
                                                                val=0)),
     ValueError, "override.*'neck'.*submodule"),
    (dict(val=1, layer='Conv2d'), ValueError, "needs a 'type'"),
    ('Pretrained', TypeError, 'dict or a list of dicts'),
])
def test_invalid_init_cfg_is_refused_before_any_change(init_cfg, error, match) -> None:
    model = OverLoCK(TINY, init_cfg=init_cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        model.init_weights()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_second_init_weights_call_changes_nothing() -> None:
    model = OverLoCK(TINY)
    model.init_weights()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.init_weights()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


# ------------------------------------------------------------------------------------------------
# Issue 16.3: detection vs segmentation form
# ------------------------------------------------------------------------------------------------
def _dense_checkpoint(tmp_path: Path, overview_fusion: bool) -> str:
    torch.manual_seed(1)
    source = OverLoCK(TINY, overview_fusion=overview_fusion)
    state = {f'backbone.{k}': v for k, v in source.state_dict().items()}
    return save(tmp_path / f'dense_{overview_fusion}.pth', {'state_dict': state})


def test_segmentation_checkpoint_is_refused_by_the_detection_form(tmp_path: Path) -> None:
    path = _dense_checkpoint(tmp_path, overview_fusion=False)
    model = OverLoCK(TINY, overview_fusion=True,
                     init_cfg=dict(type='Pretrained', checkpoint=path, prefix='backbone.'))
    with pytest.raises(ValueError, match=r'segmentation form of OverLoCK \(overview_fusion=False\)'
                                         r'.*matches overview_fusion=False'):
        model.init_weights()


def test_detection_checkpoint_is_refused_by_the_segmentation_form(tmp_path: Path) -> None:
    path = _dense_checkpoint(tmp_path, overview_fusion=True)
    model = OverLoCK(TINY, overview_fusion=False)
    with pytest.raises(ValueError, match=r'detection form of OverLoCK \(overview_fusion=True\)'
                                         r'.*matches overview_fusion=True'):
        model.load_pretrained(path, prefix='backbone.')


@pytest.mark.parametrize('overview_fusion', [True, False], ids=['detection', 'segmentation'])
def test_imagenet_checkpoint_loads_into_both_forms(tmp_path: Path, overview_fusion: bool) -> None:
    state = imagenet_state()
    path = save(tmp_path / 'in1k.pth', {'model': state})
    model = OverLoCK(TINY, overview_fusion=overview_fusion)
    missing, unexpected = model.load_pretrained(path)
    assert unexpected == []
    new = {f'extra_norm.{i}.{p}' for i in range(5 if overview_fusion else 4)
           for p in ('weight', 'bias')}
    if overview_fusion:
        new |= {f'h_proj.{i}.{p}' for i in range(2) for p in ('weight', 'bias')}
    assert set(missing) == new
    assert torch.equal(model.state_dict()['sub_blocks4.1.ls2.weight'],
                       state['sub_blocks4.1.ls2.weight'])


def test_matching_dense_checkpoints_load_completely(tmp_path: Path) -> None:
    for overview_fusion in (True, False):
        path = _dense_checkpoint(tmp_path, overview_fusion)
        missing, unexpected = OverLoCK(TINY, overview_fusion=overview_fusion).load_pretrained(
            path, prefix='backbone.')
        assert missing == [] and unexpected == []


# ------------------------------------------------------------------------------------------------
# Issue 16.2: the deprecated ``pretrained`` argument (mmseg's EncoderDecoder passes it)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('cls, arch', [(OverLoCK, TINY), (GLNet, TINY_G)])
def test_model_zoo_name_of_another_network_is_ignored_with_a_warning(cls, arch) -> None:
    with pytest.warns(UserWarning, match=r"ignoring pretrained='open-mmlab://resnet50_v1c'.*"
                                         r'init_cfg') as record:
        model = cls(arch, pretrained=RESNET_ZOO)
    assert len([w for w in record if 'ignoring pretrained' in str(w.message)]) == 1
    assert model.init_cfg is None
    model.init_weights()  # nothing is downloaded or loaded
    kept = dict(type='Pretrained', checkpoint='ours.pth')
    with pytest.warns(UserWarning, match='ignoring pretrained'):
        assert cls(arch, pretrained='torchvision://resnet50', init_cfg=kept).init_cfg == kept


def test_pretrained_path_becomes_init_cfg(tmp_path: Path) -> None:
    state = imagenet_state()
    path = save(tmp_path / 'in1k.pth', {'model': state})
    with pytest.warns(FutureWarning, match='pretrained is deprecated'):
        model = OverLoCK(TINY, pretrained=path)
    assert model.init_cfg == dict(type='Pretrained', checkpoint=path)
    model.init_weights()
    assert torch.equal(model.state_dict()['blocks2.0.proj.1.lk_origin.weight'],
                       state['blocks2.0.proj.1.lk_origin.weight'])
    with pytest.raises(ValueError, match='both pretrained=.* and init_cfg=.* are set'):
        OverLoCK(TINY, pretrained=path, init_cfg=dict(type='Pretrained', checkpoint=path))
    with pytest.raises(TypeError, match='pretrained must be a checkpoint path'):
        GLNet(TINY_G, pretrained=True)


def test_stock_mmseg_encoder_decoder_with_resnet_pretrained_builds() -> None:
    from mmengine.config import ConfigDict
    from mmseg.registry import MODELS

    # as a stock base config gives it: model.pretrained set, a config dict for the backbone
    cfg = ConfigDict(type='EncoderDecoder', pretrained=RESNET_ZOO,
               backbone=dict(type='OverLoCK', arch=TINY, overview_fusion=False),
               decode_head=dict(type='FCNHead', in_channels=120, in_index=3, channels=16,
                                num_convs=1, num_classes=3))
    with pytest.warns(UserWarning, match='ignoring pretrained'):
        model = MODELS.build(cfg)
    assert isinstance(model.backbone, OverLoCK) and model.backbone.init_cfg is None
    model.init_weights()


# ------------------------------------------------------------------------------------------------
# Issue 13.3: one checkpoint-entry rule for GLNet (backbone and timm classifier)
# ------------------------------------------------------------------------------------------------
def _glnet_both_entries(tmp_path: Path) -> tuple[str, dict, dict]:
    torch.manual_seed(0)
    plain = GLNetClassifier(TINY_G).state_dict()
    torch.manual_seed(1)
    ema = GLNetClassifier(TINY_G).state_dict()
    return save(tmp_path / 'both.pth', {'model': plain, 'model_ema': ema}), plain, ema


def test_glnet_entry_rule_follows_the_release() -> None:
    # The authors' release: weights under 'model', for GLNet-16G under 'model_ema'.
    both = {'model': {'w': 0}, 'model_ema': {'w': 1}}
    for arch in ('stl', 'stl_paramslot', '4g', '9g', None):
        assert select_checkpoint_state(both, arch) == {'w': 0}, arch
    assert select_checkpoint_state(both, '16g') == {'w': 1}
    assert select_checkpoint_state({'model_ema': {'w': 1}}, '4g') == {'w': 1}
    assert select_checkpoint_state({'model': {'w': 0}}, '16g') == {'w': 0}
    assert checkpoint_state_keys('16g')[0] == 'state_dict'  # our own checkpoints first


def test_glnet_backbone_and_timm_paths_load_the_same_entry(tmp_path: Path) -> None:
    path, plain, ema = _glnet_both_entries(tmp_path)
    with mm_log() as log:
        backbone = GLNet(TINY_G, init_cfg=dict(type='Pretrained', checkpoint=path))
        backbone.init_weights()
    assert any(f"{path}: weights taken from entry 'model'" in m for m in log)
    # timm: pretrained=True with a file (custom_load: the classifier's load_pretrained) ...
    with mm_log() as log:
        classifier = glnet_timm._create('glnet_4g', TINY_G, True,
                                        pretrained_cfg_overlay=dict(file=path))
    assert any("weights taken from entry 'model'" in m for m in log)
    # ... and with a state dict (pretrained_filter_fn)
    filtered = _unwrap_checkpoint({'model': plain, 'model_ema': ema}, classifier)
    assert filtered is plain
    for key, value in plain.items():
        assert torch.equal(classifier.state_dict()[key], value), key
        if not key.startswith(('head.', 'norm.')):
            assert torch.equal(backbone.state_dict()[key], value), key


def test_glnet_classifier_load_pretrained_checks_arch_and_head(tmp_path: Path) -> None:
    path, plain, _ = _glnet_both_entries(tmp_path)
    model = GLNetClassifier(TINY_G, num_classes=7)
    result = model.load_pretrained(path)
    assert sorted(result.ignored) == ['head.bias', 'head.weight']
    assert model.head.weight.shape == (7, 128)
    assert torch.equal(model.state_dict()['norm.weight'], plain['norm.weight'])
    other = GLNetClassifier(dict(TINY_G, embed_dim=[32, 64, 96, 160]))
    with pytest.raises(ValueError, match=r'arch mismatch.*embed_dim'):
        other.load_pretrained(path)


# ------------------------------------------------------------------------------------------------
# Issue 13.4: downstream registries
# ------------------------------------------------------------------------------------------------
def test_broken_downstream_library_is_skipped_with_one_warning(monkeypatch) -> None:
    real = mm_registry.importlib.import_module

    def fake(name: str, *args, **kwargs):
        if name == 'mmseg.registry':
            raise AssertionError('MMCV==2.2.0 is used but incompatible. Please install '
                                 'mmcv>=2.0.0rc4.')
        if name == 'mmfake.registry':
            raise ModuleNotFoundError("No module named 'mmfake'", name='mmfake')
        return real(name, *args, **kwargs)

    monkeypatch.setattr(mm_registry.importlib, 'import_module', fake)
    names = ('mmdet.registry', 'mmseg.registry', 'mmfake.registry')
    mm_registry._load_registries.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter('always')
            first = mm_registry.available_model_registries(names)
            second = mm_registry.available_model_registries(names)
    finally:
        mm_registry._load_registries.cache_clear()
    from mmdet.registry import MODELS as DET_MODELS
    assert first == second == [DET_MODELS]
    messages = [str(w.message) for w in record]
    assert len(messages) == 1  # one warning, for mmseg; the missing library is skipped quietly
    assert 'mmseg is installed but cannot be imported' in messages[0]
    assert 'AssertionError: MMCV==2.2.0 is used but incompatible' in messages[0]


def test_import_mmoverlock_survives_a_broken_mmseg(tmp_path: Path) -> None:
    # An installed mmseg whose import fails the way a version check does.
    (tmp_path / 'mmseg').mkdir()
    (tmp_path / 'mmseg' / '__init__.py').write_text(
        "raise AssertionError('MMCV==9.9.9 is used but incompatible')\n")
    script = textwrap.dedent('''
        import json, warnings
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter('always')
            import mmoverlock
        from mmdet.registry import MODELS
        print(json.dumps(dict(
            warnings=[str(w.message) for w in record if 'cannot be imported' in str(w.message)],
            registered=sorted(k for k in ('OverLoCK', 'GLNet') if k in MODELS.module_dict))))
    ''')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]),
               OMP_NUM_THREADS='1')
    out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result['registered'] == ['GLNet', 'OverLoCK']
    assert len(result['warnings']) == 1
    assert 'mmseg is installed but cannot be imported (AssertionError: MMCV==9.9.9' in \
        result['warnings'][0]


def test_foreign_class_of_the_same_name_is_not_replaced() -> None:
    registry = Registry('model', scope='foreign_scope')

    class OverLoCK(nn.Module):  # another package's backbone of the same name
        pass

    registry.register_module(module=OverLoCK)
    from mmoverlock.models.backbones.overlock import OverLoCK as Ours
    with pytest.raises(mm_registry.RegistryConflictError,
                       match=r"already holds 'OverLoCK' = .*test_init_registry.*<locals>.OverLoCK"
                             r'.*will not replace it with mmoverlock.models.backbones.overlock'):
        mm_registry.register_into(Ours, [registry])
    assert registry.get('OverLoCK') is OverLoCK


def test_same_class_is_re_registered_on_reload() -> None:
    registry = Registry('model', scope='reload_scope')
    mm_registry.register_into(OverLoCK, [registry])
    # what importlib.reload produces: a new class object with the same qualified name
    reloaded = type('OverLoCK', (OverLoCK,), {'__module__': OverLoCK.__module__,
                                              '__qualname__': OverLoCK.__qualname__})
    mm_registry.register_into(reloaded, [registry])
    assert registry.get('OverLoCK') is reloaded


def test_real_registries_hold_our_classes() -> None:
    from mmdet.registry import MODELS as DET_MODELS
    from mmseg.registry import MODELS as SEG_MODELS
    for registry in (DET_MODELS, SEG_MODELS):
        assert registry.get('OverLoCK') is OverLoCK and registry.get('GLNet') is GLNet


# ------------------------------------------------------------------------------------------------
# Issue 13.7: timm features_only
# ------------------------------------------------------------------------------------------------
def test_timm_overlock_features_only() -> None:
    torch.manual_seed(0)
    model = timm.create_model('overlock_xt', features_only=True).eval()
    assert model.feature_info.channels() == [56, 112, 340, 420]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(1, 56, 16, 16), (1, 112, 8, 8), (1, 340, 4, 4),
                                              (1, 420, 2, 2)]


@pytest.mark.parametrize('out_indices', [(1, 3), (0, -2), (2,)])
def test_overlock_features_equal_the_classifier_stages(out_indices: tuple) -> None:
    torch.manual_seed(0)
    classifier = OverLoCKClassifier(TINY, num_classes=5).eval()
    model = overlock_timm._create('overlock_xt', TINY, features_only=True,
                                  out_indices=out_indices).eval()
    missing, unexpected = model.model.load_state_dict(classifier.state_dict(), strict=False)
    assert missing == [] and all(k.startswith(('head.', 'aux_head.')) for k in unexpected)
    absolute = [i % 4 for i in out_indices]
    widths = [16, 32, 88, 120]
    assert model.feature_info.channels() == [widths[i] for i in absolute]
    x = torch.randn(2, 3, 72, 56)
    with torch.no_grad():
        feats = model(x)
        stages, _ = classifier.forward_features(x)
    assert len(feats) == len(absolute)
    for feat, i in zip(feats, absolute):
        assert feat.shape == (2, widths[i], -(-72 // 4 // 2 ** i), -(-56 // 4 // 2 ** i))
        torch.testing.assert_close(feat, stages[i], rtol=0, atol=0)


def test_timm_glnet_features_only() -> None:
    model = timm.create_model('glnet_4g', features_only=True, out_indices=(0, 2)).eval()
    assert model.feature_info.channels() == [64, 256]
    assert model.feature_info.reduction() == [4, 16]
    assert len(model.model.stages) == 3  # the last stage is pruned
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(1, 64, 16, 16), (1, 256, 4, 4)]


@pytest.mark.parametrize('out_indices', [(0, 1, 2, 3), (1, -1)])
def test_glnet_features_equal_the_classifier_stages(out_indices: tuple) -> None:
    torch.manual_seed(0)
    classifier = GLNetClassifier(TINY_G).eval()
    model = glnet_timm._create('glnet_4g', TINY_G, False, features_only=True,
                               out_indices=out_indices).eval()
    model.model.load_state_dict(classifier.state_dict(), strict=False)
    absolute = [i % 4 for i in out_indices]
    assert model.feature_info.channels() == [TINY_G['embed_dim'][i] for i in absolute]
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        feats = model(x)
        stages = classifier.forward_stages(x)
    for feat, i in zip(feats, absolute):
        torch.testing.assert_close(feat, stages[i], rtol=0, atol=0)


def test_out_indices_without_features_only_is_an_error() -> None:
    for name in ('overlock_xt', 'glnet_4g'):
        with pytest.raises(ValueError, match='features_only=True'):
            timm.create_model(name, out_indices=(1,))
