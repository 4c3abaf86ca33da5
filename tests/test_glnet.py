"""GLNet backbone: reference outputs, manifests, checkpoint loading, training-mode behaviour."""
from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import timm
import torch
from backbone_testing import (
    assert_close_to_scale,
    load_manifest,
    load_reference,
    random_loss,
    randomize_bn,
)
from torch import nn

import mmoverlock  # noqa: F401  (registration, safe loading)
from mmoverlock.models.backbones.glnet import GLNet, checkpoint_state_keys
from mmoverlock.models.classifiers import GLNetClassifier
from mmoverlock.models.classifiers.glnet_timm import _unwrap_checkpoint
from mmoverlock.models.layers.glnet_blocks import GLMixBlock
from mmoverlock.models.utils.pretrained import read_state_dict

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ('stl', 'stl_paramslot', '4g', '9g', '16g')
#: Published parameter counts (millions) of the ImageNet classifiers.
PUBLISHED_PARAMS = {'stl': 30, 'stl_paramslot': 30, '4g': 27, '9g': 60, '16g': 106}
#: Small archs with the released structures: 4g/9g/16g-like (overlapping stem, CPE, alternating
#: GLMix / attention, layer scale) and stl-like (patchify stem, learned slots, token stage).
TINY_G = dict(depth=[1, 1, 2, 1], embed_dim=[32, 64, 96, 128], mlp_ratios=3,
              mixing_modes=['glmix', 'glmix', 'glmix.mha_nchw', 'mha_nchw'], layerscale=1e-4)
TINY_STL = dict(depth=[1, 1, 2, 1], embed_dim=[32, 64, 96, 128], mlp_ratios=4,
                mixing_modes=['glmix', 'glmix', 'glmix', 'mha'], cpe_ks=0, mlp_dw=False,
                downsample_style='nonovlp', transition_layout='norm.proj', slot_init='param')


@pytest.fixture(scope='module')
def reference() -> dict:
    return load_reference('glnet')


@pytest.fixture(scope='module')
def manifest() -> dict:
    return load_manifest('glnet')


def shapes(state: dict) -> list:
    return [(k, list(v.shape)) for k, v in state.items()]


# ------------------------------------------------------------------------------------------------
# Numerical equivalence with the authors' code
# ------------------------------------------------------------------------------------------------
def test_reproduces_reference_outputs(reference: dict) -> None:
    # The reference configuration normalises its stem / downsampling layers with channel
    # LayerNorms (its state dict has no BN buffers); everything else is as released.
    model = GLNet(dict(reference['arch'], downsample_norm='ln')).eval()
    state = {k: v for k, v in reference['state_dict'].items() if not k.startswith('norm.')}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith('out_norms.') for k in missing)
    with torch.no_grad():
        for inputs, expected in zip(reference['inputs'], reference['outputs']):
            stages = model.forward_stages(inputs)
            assert len(stages) == len(expected) == 4
            for out, exp in zip(stages, expected):
                assert out.shape == exp.shape
                assert_close_to_scale(out, exp, msg='output vs the authors\' code')
            outputs = model(inputs)
            for i, (out, raw) in enumerate(zip(outputs, stages)):
                torch.testing.assert_close(out, model.out_norms[str(i)](raw))


def test_reference_classifier_loads_strictly(reference: dict) -> None:
    classifier = GLNetClassifier(dict(reference['arch'], downsample_norm='ln'), num_classes=0)
    classifier.load_state_dict(reference['state_dict'], strict=True)


# ------------------------------------------------------------------------------------------------
# Parameter names and shapes of the released models
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('arch', ARCHS)
def test_manifest(manifest: dict, arch: str) -> None:
    expected = [(k, list(s)) for k, s in manifest[arch]]
    with torch.device('meta'):
        backbone = GLNet(arch)
        classifier = timm.create_model(f'glnet_{arch}')
    assert isinstance(classifier, GLNetClassifier)
    assert shapes(classifier.state_dict()) == expected
    own = [e for e in shapes(backbone.state_dict()) if not e[0].startswith('out_norms.')]
    assert own == [e for e in expected if not e[0].startswith(('head.', 'norm.'))]
    assert {k for k in backbone.state_dict() if k.startswith('out_norms.')} == {
        f'out_norms.{i}.{p}' for i in range(4) for p in ('weight', 'bias')}
    params = sum(v.numel() for k, v in classifier.state_dict().items() if v.dim())
    assert round(params / 1e6) == PUBLISHED_PARAMS[arch]
    assert backbone.out_channels[3] == dict(manifest[arch])['head.weight'][1]


def test_timm_names_do_not_clash() -> None:
    assert sorted(timm.list_models('glnet*')) == sorted(f'glnet_{a}' for a in ARCHS)


# ------------------------------------------------------------------------------------------------
# Construction errors
# ------------------------------------------------------------------------------------------------
def test_unknown_arch_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"'stl', 'stl_paramslot', '4g', '9g', '16g'"):
        GLNet('8g')
    with pytest.raises(ValueError, match='missing keys'):
        GLNet(dict(depth=[1, 1, 1, 1], embed_dim=[32, 64, 96, 128]))
    with pytest.raises(ValueError, match="'mha' blocks work on tokens"):
        GLNet(dict(TINY_G, mixing_modes=['glmix', 'glmix', 'glmix.mha', 'mha']))


# ------------------------------------------------------------------------------------------------
# Loading the authors' checkpoints
# ------------------------------------------------------------------------------------------------
def authors_checkpoint(arch: dict, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return randomize_bn(GLNetClassifier(arch), seed).state_dict()


@pytest.mark.parametrize('arch', [TINY_G, TINY_STL], ids=['4g-like', 'stl-like'])
@pytest.mark.parametrize('layout', ['model', 'model_ema'])
def test_load_authors_checkpoint(tmp_path: Path, arch: dict, layout: str) -> None:
    state = authors_checkpoint(arch)
    path = tmp_path / 'glnet.pth'
    torch.save({layout: state, 'epoch': 299}, path)
    model = GLNet(arch, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    result = model.load_pretrained(str(path))
    assert result.unexpected == []
    assert sorted(result.missing) == sorted(
        f'out_norms.{i}.{p}' for i in range(4) for p in ('weight', 'bias'))
    assert sorted(result.ignored) == sorted(k for k in state if k.startswith(('head.', 'norm.')))
    fresh = GLNet(arch, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    fresh.init_weights()
    for key, value in fresh.state_dict().items():
        if not key.startswith('out_norms.'):
            torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def test_16g_prefers_the_ema_weights(tmp_path: Path) -> None:
    path = tmp_path / 'both.pth'
    torch.save({'model': {'w': torch.zeros(1)}, 'model_ema': {'w': torch.ones(1)}}, path)
    state = read_state_dict(str(path), state_keys=checkpoint_state_keys('16g'))
    assert state['w'].item() == 1
    with torch.device('meta'):
        model = GLNetClassifier('16g')
    assert _unwrap_checkpoint({'model_ema': {'w': 1}, 'model': {'w': 0}}, model) == {'w': 1}
    # the other releases keep their weights under 'model' (see also test_init_registry.py)
    assert read_state_dict(str(path), state_keys=checkpoint_state_keys('4g'))['w'].item() == 0


def test_own_checkpoint_with_prefix_loads_everything(tmp_path: Path) -> None:
    model = randomize_bn(GLNet(TINY_G))
    path = tmp_path / 'det.pth'
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in model.state_dict().items()}}, path)
    other = GLNet(TINY_G, out_indices=(2, 3))
    result = other.load_pretrained(str(path), prefix='backbone.')
    assert result.missing == [] and result.unexpected == []


def test_wrong_arch_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / 'stl_like.pth'
    torch.save({'model': authors_checkpoint(TINY_STL)}, path)
    model = GLNet(TINY_G, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(ValueError, match=r'arch mismatch.*downsample_style: checkpoint nonovlp'):
        model.init_weights()
    # Released archs: the error names the arch that fits.
    with torch.device('meta'):
        stl = timm.create_model('glnet_stl').state_dict()
        g4 = GLNet('4g')
    with pytest.raises(ValueError, match=r"arch mismatch.*arch='4g'.*matches arch='stl'"):
        g4.check_compatible({k: v for k, v in stl.items() if not k.startswith('head.')})
    with torch.device('meta'):
        g9 = GLNet('9g')
    with pytest.raises(ValueError, match=r"embed_dim: checkpoint \[64, 128, 256, 512\].*'4g'"):
        g9.check_compatible(g4.state_dict())
    with pytest.raises(ValueError, match='does not look like a GLNet'):
        g4.check_compatible({'backbone.stages.0.blocks.0.norm1.weight': torch.zeros(1)})


# ------------------------------------------------------------------------------------------------
# Training-mode behaviour
# ------------------------------------------------------------------------------------------------
def test_frozen_stages_and_norm_eval() -> None:
    torch.manual_seed(0)
    model = randomize_bn(GLNet(TINY_G, frozen_stages=2, norm_eval=True))
    model.train()
    frozen = [model.downsample_layers[0], model.stages[0], model.out_norms['0'],
              model.downsample_layers[1], model.stages[1], model.out_norms['1']]
    for module in frozen:
        assert not module.training
        assert all(not p.requires_grad for p in module.parameters())
    assert model.stages[2].training
    assert all(p.requires_grad for p in model.stages[2].parameters())
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    random_loss(model(torch.randn(2, 3, 64, 64))).backward()
    opt.step()
    after = model.state_dict()
    for key, value in before.items():
        changed = not torch.equal(value, after[key])
        if key.startswith(('downsample_layers.0.', 'downsample_layers.1.', 'stages.0.',
                           'stages.1.', 'out_norms.0.', 'out_norms.1.')) or 'running' in key:
            assert not changed, key
    assert not torch.equal(before['stages.2.blocks.0.mlp.0.weight'],
                           after['stages.2.blocks.0.mlp.0.weight'])


@pytest.mark.parametrize('arch', [TINY_G, TINY_STL], ids=['4g-like', 'stl-like'])
def test_checkpointing_gives_same_gradients(arch: dict) -> None:
    torch.manual_seed(0)
    plain = randomize_bn(GLNet(arch)).train()
    grads = {}
    for with_cp in (False, True, [1, 0, 2, 1]):
        model = copy.deepcopy(plain)
        model.cp_counts = model.checkpoint_counts(with_cp, model.arch_settings['depth'], 'abcd')
        x = torch.randn(2, 3, 48, 40, generator=torch.Generator().manual_seed(1))
        random_loss(model(x)).backward()
        grads[str(with_cp)] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name in grads['False']:
        for other in ('True', '[1, 0, 2, 1]'):
            torch.testing.assert_close(grads[other][name], grads['False'][name], rtol=1e-5,
                                       atol=1e-6, msg=name)
    with pytest.raises(ValueError, match='with_cp'):
        GLNet(arch, with_cp=[1, 1, 3, 1])


@pytest.mark.parametrize('arch', [TINY_G, TINY_STL], ids=['4g-like', 'stl-like'])
@pytest.mark.parametrize('size', [(33, 47), (61, 37), (97, 131)])
def test_odd_input_sizes(arch: dict, size: tuple) -> None:
    model = GLNet(arch, drop_path_rate=0.1).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *size))
    stl_like = arch is TINY_STL

    def down(n: int, stage: int) -> int:
        if stl_like:  # patchify convs: 4x4 stride 4, then 2x2 stride 2
            return n // 4 if stage == 0 else n // 2
        n = (n + 1) // 2  # 3x3 stride 2 padding 1
        return (n + 1) // 2 if stage == 0 else n

    h, w = size
    for i, out in enumerate(outs):
        h, w = down(h, i), down(w, i)
        assert out.shape == (1, model.out_channels[i], h, w)
        assert torch.isfinite(out).all()


def test_out_indices_and_registries() -> None:
    from mmdet.registry import MODELS as DET_MODELS
    from mmseg.registry import MODELS as SEG_MODELS
    for registry in (DET_MODELS, SEG_MODELS):
        model = registry.build(dict(type='GLNet', arch=TINY_G, out_indices=(1, 3)))
        assert isinstance(model, GLNet) and sorted(model.out_norms) == ['1', '3']
        outs = model(torch.randn(1, 3, 64, 64))
        assert [o.shape[1] for o in outs] == [64, 128]


# ------------------------------------------------------------------------------------------------
# Slot visualisation
# ------------------------------------------------------------------------------------------------
def load_tool():
    spec = importlib.util.spec_from_file_location('visualize_slots',
                                                  ROOT / 'tools' / 'visualize_slots.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_slot_assignments_do_not_change_outputs() -> None:
    tool = load_tool()
    torch.manual_seed(0)
    model = GLNet(TINY_G).eval()
    x = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        plain = model(x)
    names = tool.glmix_blocks(model)
    assert names == ['0.0', '1.0', '2.0']
    logits, outputs = tool.collect_assignments(model, x, names)
    for a, b in zip(plain, outputs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert logits['1.0'].shape == (1, 64, 9, 12)
    block = model.stages[0].blocks[0]
    assert isinstance(block, GLMixBlock)
    with pytest.raises(ValueError, match='not a GLMix block'):
        tool.collect_assignments(model, x, ['2.1'])


def test_visualize_slots_tool_writes_png(tmp_path: Path) -> None:
    tool = load_tool()
    out = tmp_path / 'slots.png'
    tool.main(['--arch', '4g', '--size', '96', '--blocks', '0.0', '2.2', '--num-heatmaps', '2',
               '--out', str(out)])
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('path', sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(
    'configs/*/*glnet*.py') if p.parent.name != 'dropin'))  # dropin/: tests/test_dropin.py
def test_config_widths_match_the_backbone(path: str) -> None:
    from mmengine.config import Config
    cfg = Config.fromfile(str(ROOT / path))
    backbone = cfg.model.backbone
    assert backbone.type == 'GLNet'
    dims = GLNet.resolve_arch(backbone.arch)['embed_dim']
    if 'detection' in path:
        assert cfg.model.neck.in_channels == dims
    else:
        assert cfg.model.decode_head.in_channels == dims
        assert cfg.model.auxiliary_head.in_channels == dims[cfg.model.auxiliary_head.in_index]
    custom = cfg.optim_wrapper.paramwise_cfg.custom_keys
    assert custom['slot_scale']['decay_mult'] == 0.0
