"""OverLoCK backbone: reference outputs, manifests, loading, training-mode behaviour."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from backbone_testing import (
    assert_close_to_scale,
    gradient_floor,
    load_manifest,
    load_reference,
    random_loss,
    randomize_bn,
)
from torch import nn

import mmoverlock  # noqa: F401  (registration, safe loading)
from mmoverlock.models.backbones.overlock import OverLoCK
from mmoverlock.models.classifiers import OverLoCKClassifier

FORMS = ('detection', 'segmentation')
ARCHS = ('xt', 't', 's', 'b')
#: Published parameter counts (millions) of the ImageNet classifiers, as the paper counts them.
PUBLISHED_PARAMS = dict(xt=16, t=33, s=56, b=95)
#: Gradients of two float32 computations of a whole tiny network in training mode, relative to
#: their scale (see backbone_testing.assert_close_to_scale). Looser than the outputs' 1e-4: with
#: BatchNorm on batch statistics of tiny maps (8 values per channel in the last stage) the
#: network's gradients are ill-conditioned, so summation-order differences of 1e-6 grow to ~1e-4
#: (observed: up to 1.4e-4 between CPU routes); a real error moves them by O(1) of their scale.
GRAD_REL = 1e-3
#: A small arch that runs in milliseconds (same block structure as the released ones).
TINY = dict(depth=[1, 1, 1, 1], sub_depth=[2, 2], embed_dim=[16, 32, 64, 96],
            kernel_size=[9, 7, 7, 5], sub_num_heads=[2, 3], mlp_ratio=[4, 4, 4, 4],
            sub_mlp_ratio=[3, 3])


@pytest.fixture(scope='module')
def reference() -> dict:
    return load_reference('overlock')


@pytest.fixture(scope='module')
def manifest() -> dict:
    return load_manifest('overlock')


def shapes(state: dict) -> dict:
    return {k: list(v.shape) for k, v in state.items()}


# ------------------------------------------------------------------------------------------------
# Numerical equivalence with the authors' code
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('form', FORMS)
@pytest.mark.parametrize('deploy', [False, True], ids=['train-form', 'reparameterized'])
@pytest.mark.parametrize('channels_last', [True, False], ids=['channels-last', 'contiguous'])
def test_reproduces_reference_outputs(reference: dict, form: str, deploy: bool,
                                      channels_last: bool) -> None:
    model = OverLoCK(arch=reference['arch'], overview_fusion=form == 'detection',
                     channels_last=channels_last).eval()
    model.load_state_dict(reference[form]['state_dict'], strict=True)
    if deploy:
        model.reparameterize()
    # Without autograd the training form merges its branches on the fly; with autograd it runs
    # every branch. Both must reproduce the reference.
    for grad_enabled in ([False] if deploy else [False, True]):
        with torch.set_grad_enabled(grad_enabled):
            for inputs, expected in zip(reference['inputs'], reference[form]['outputs']):
                outputs = model(inputs)
                assert len(outputs) == len(expected) == 4
                for out, exp in zip(outputs, expected):
                    assert out.shape == exp.shape
                    assert_close_to_scale(out, exp, msg='output vs the authors\' code')


# ------------------------------------------------------------------------------------------------
# Names and shapes of the released checkpoints
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('form', FORMS + ('classification',))
def test_state_dict_matches_manifest(manifest: dict, arch: str, form: str) -> None:
    with torch.device('meta'):
        if form == 'classification':
            model = OverLoCKClassifier(arch)
        else:
            model = OverLoCK(arch, overview_fusion=form == 'detection')
    expected = {k: v for k, v in manifest[arch][form]}
    ours = shapes(model.state_dict())
    assert list(ours) == list(expected)  # same keys, same order
    assert ours == expected


@pytest.mark.parametrize('arch', ARCHS)
def test_classifier_parameter_count_matches_paper(arch: str) -> None:
    # The paper counts the deployed network (re-parameterised, without the auxiliary head).
    with torch.device('meta'):
        model = OverLoCKClassifier(arch).reparameterize()
    count = sum(p.numel() for n, p in model.named_parameters() if not n.startswith('aux_head'))
    assert abs(count / 1e6 - PUBLISHED_PARAMS[arch]) / PUBLISHED_PARAMS[arch] < 0.03


@pytest.mark.parametrize('arch, channels', [('xt', [56, 112, 340, 420]),
                                            ('t', [64, 128, 384, 640]),
                                            ('s', [64, 128, 448, 640]),
                                            ('b', [80, 160, 528, 720])])
def test_out_channels(arch: str, channels: list) -> None:
    with torch.device('meta'):
        assert OverLoCK(arch).out_channels == channels


def test_arch_aliases_and_errors() -> None:
    assert OverLoCK.resolve_arch('tiny') == OverLoCK.resolve_arch('T')
    with pytest.raises(ValueError, match=r"unknown OverLoCK arch 'huge'.*'b'.*'xt'"):
        OverLoCK('huge')
    bad = dict(TINY)
    del bad['sub_depth']
    with pytest.raises(ValueError, match='missing keys.*sub_depth'):
        OverLoCK(bad)
    with pytest.raises(ValueError, match='out_indices'):
        OverLoCK(TINY, out_indices=(4,))
    with pytest.raises(ValueError, match='with_cp'):
        OverLoCK(TINY, with_cp=[1, 1])


# ------------------------------------------------------------------------------------------------
# Any input size
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('size', [(65, 97), (33, 47), (64, 64), (17, 230)])
def test_any_input_size(size: tuple) -> None:
    model = OverLoCK(TINY).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *size))
    h, w = size
    for out, stride, ch in zip(outs, (4, 8, 16, 32), model.out_channels):
        assert out.shape[1] == ch
        # 3x3 stride-2 convs with padding 1: ceil division at every step
        eh, ew = h, w
        for _ in range({4: 2, 8: 3, 16: 4, 32: 5}[stride]):
            eh, ew = (eh + 1) // 2, (ew + 1) // 2
        assert out.shape[-2:] == (eh, ew)
        assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------
# Re-parameterisation, freezing, checkpointing
# ------------------------------------------------------------------------------------------------
def test_reparameterize_keeps_outputs_and_matches_deploy_build() -> None:
    torch.manual_seed(0)
    model = randomize_bn(OverLoCK(TINY)).eval()
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        before = model(x)
        deployed = copy.deepcopy(model).reparameterize()
        after = deployed(x)
    for a, b in zip(before, after):
        assert_close_to_scale(b, a, msg='re-parameterised output')
    # the converted state dict is exactly the one of a backbone built with deploy=True
    fresh = OverLoCK(TINY, deploy=True)
    assert shapes(fresh.state_dict()) == shapes(deployed.state_dict())
    assert not any('origin_bn' in k or 'dil_conv' in k for k in deployed.state_dict())


def test_frozen_stages_and_norm_eval() -> None:
    model = OverLoCK(TINY, frozen_stages=2, norm_eval=True)
    model.train()
    frozen = ('patch_embed1.', 'blocks1.', 'extra_norm.0.', 'patch_embed2.', 'blocks2.',
              'extra_norm.1.')
    for name, param in model.named_parameters():
        assert param.requires_grad == (not name.startswith(frozen)), name
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            assert not module.training, name
    # frozen stages stay frozen through a training step
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    random_loss(model(torch.randn(2, 3, 64, 64))).backward()
    opt.step()
    after = model.state_dict()
    for key in before:
        changed = not torch.equal(before[key], after[key])
        if key.startswith(frozen) or 'running_' in key or 'num_batches' in key:
            assert not changed, key
    assert not torch.equal(before['sub_blocks4.1.ls2.weight'], after['sub_blocks4.1.ls2.weight'])


def test_frozen_stages_without_norm_eval_keeps_later_bn_training() -> None:
    model = OverLoCK(TINY, frozen_stages=1).train()
    assert not model.patch_embed1[1].training
    assert model.patch_embed2[1].training


def test_channels_last_layout_changes_nothing_but_speed() -> None:
    x = torch.randn(2, 3, 64, 96)

    def step(channels_last: bool) -> tuple[list, dict]:
        torch.manual_seed(1)
        # large kernels in the first stages exercise the FFT weight gradient too
        model = OverLoCK(dict(TINY, kernel_size=[13, 11, 7, 5]),
                         channels_last=channels_last).train()
        outs = model(x)
        random_loss(outs).backward()
        return [o.detach() for o in outs], {n: p.grad for n, p in model.named_parameters()}

    outs, grads = step(True)
    ref_outs, ref_grads = step(False)
    for out, ref in zip(outs, ref_outs):
        assert out.is_contiguous()  # outputs in the ordinary layout for the neck
        assert_close_to_scale(out, ref, msg='output')
    floor = gradient_floor(ref_grads)
    for name, grad in ref_grads.items():
        assert_close_to_scale(grads[name], grad, GRAD_REL, msg=name, floor=floor)


@pytest.mark.parametrize('with_cp, selective_cp', [(True, False), ([1, 0, 1, 0, 2, 1], True),
                                                  (False, True),
                                                  ([1, 0, 0, 0, 0, 0], ['blocks3', 'sub_blocks3'])],
                         ids=['full', 'mixed', 'selective', 'selective-lists'])
def test_recomputation_gives_same_gradients_and_bn_statistics(with_cp, selective_cp) -> None:
    x = torch.randn(2, 3, 64, 64)

    def step(**kwargs) -> tuple[dict, dict]:
        torch.manual_seed(1)
        model = OverLoCK(TINY, drop_path_rate=0.2, **kwargs).train()
        torch.manual_seed(2)  # same drop-path draws in both runs
        random_loss(model(x)).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        stats = {n: b.clone() for n, b in model.named_buffers()}
        return grads, stats

    plain_grads, plain_stats = step(with_cp=False, selective_cp=False)
    grads, stats = step(with_cp=with_cp, selective_cp=selective_cp)
    floor = gradient_floor(plain_grads)
    for name, grad in plain_grads.items():
        assert_close_to_scale(grads[name], grad, GRAD_REL, msg=name, floor=floor)
    # BatchNorm statistics are updated exactly once although blocks run twice
    for name, buf in plain_stats.items():
        assert torch.allclose(buf, stats[name], atol=1e-6), name


@pytest.mark.parametrize('selective_cp, frozen_stages, runs', [(True, -1, 2), (False, -1, 1),
                                                                (True, 1, 1)])
def test_stem_is_recomputed_in_training(selective_cp: bool, frozen_stages: int, runs: int) -> None:
    model = OverLoCK(TINY, selective_cp=selective_cp, frozen_stages=frozen_stages).train()
    calls = []
    # a pre-hook: the recomputation may stop early, once it has what the backward needs
    model.patch_embed1.register_forward_pre_hook(lambda *_: calls.append(1))
    random_loss(model(torch.randn(1, 3, 64, 64))).backward()
    assert len(calls) == runs  # forward, plus the recomputation in backward unless frozen


def test_selective_recomputation_of_chosen_block_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    from mmoverlock.models.backbones import overlock
    model = OverLoCK(TINY, selective_cp=('blocks2', 'sub_blocks4')).train()
    assert model.recomputes_selectively('blocks2') and not model.recomputes_selectively('blocks1')
    seen = []

    def spy(block, *args, selective=False):
        seen.append((block, selective))
        return block(*args)

    monkeypatch.setattr(overlock, 'checkpoint_module', spy)
    model(torch.randn(1, 3, 64, 64))
    lists = {id(b): name for name in overlock.BLOCK_LISTS for b in getattr(model, name)}
    chosen = {lists.get(id(block), 'other') for block, selective in seen if selective}
    assert chosen == {'blocks2', 'sub_blocks4'}
    # the stem follows blocks1: not recomputed here
    assert all(block is not model.patch_embed1 for block, _ in seen)


@pytest.mark.parametrize('value, error', [(('blocks5',), ValueError), ('blocks1', TypeError),
                                          (1, TypeError)])
def test_selective_cp_refuses_unknown_lists(value, error) -> None:
    with pytest.raises(error, match='selective_cp'):
        OverLoCK(TINY, selective_cp=value)


def test_drop_path_rates_are_linear_over_all_blocks() -> None:
    model = OverLoCK(TINY, drop_path_rate=0.3)
    rates = [b.proj[9].drop_prob if hasattr(b.proj[9], 'drop_prob') else 0.0
             for name in ('blocks1', 'blocks2', 'blocks3', 'blocks4')
             for b in getattr(model, name)]
    rates += [getattr(b.drop_path, 'drop_prob', 0.0)
              for name in ('sub_blocks3', 'sub_blocks4') for b in getattr(model, name)]
    expected = [0.3 * i / (len(rates) - 1) for i in range(len(rates))]
    assert rates == pytest.approx(expected)


# ------------------------------------------------------------------------------------------------
# Loading checkpoints in the authors' layouts
# ------------------------------------------------------------------------------------------------
def imagenet_checkpoint(path: Path, arch, deploy: bool = False, seed: int = 0) -> dict:
    """A checkpoint in the layout of the authors' ImageNet release (classifier, heads included)."""
    torch.manual_seed(seed)
    classifier = OverLoCKClassifier(arch, num_classes=10)
    if deploy:
        classifier.reparameterize()
    state = classifier.state_dict()
    torch.save({'model': state}, path)
    return state


def init_from(path: Path, **kwargs) -> OverLoCK:
    model = OverLoCK(TINY, init_cfg=dict(type='Pretrained', checkpoint=str(path)), **kwargs)
    model.init_weights()
    return model


def test_loads_imagenet_checkpoint_reporting_new_and_ignored_keys(tmp_path: Path) -> None:
    path = tmp_path / 'overlock_tiny_in1k.pth'
    state = imagenet_checkpoint(path, TINY)
    model = OverLoCK(TINY)
    missing, unexpected = model.load_pretrained(str(path))
    assert unexpected == []
    assert sorted(missing) == sorted(
        [f'extra_norm.{i}.{p}' for i in range(5) for p in ('weight', 'bias')]
        + ['h_proj.0.weight', 'h_proj.0.bias', 'h_proj.1.weight', 'h_proj.1.bias'])
    ours = model.state_dict()
    for key, value in state.items():
        if not key.startswith(('head.', 'aux_head.')):
            assert torch.equal(ours[key], value), key


def test_loads_reparameterized_checkpoint_into_deploy_form(tmp_path: Path) -> None:
    path = tmp_path / 'reparam.pth'
    state = imagenet_checkpoint(path, TINY, deploy=True)
    model = init_from(path, deploy=True, overview_fusion=False)
    key = 'blocks1.0.proj.1.lk_origin.bias'
    assert torch.equal(model.state_dict()[key], state[key])
    with pytest.raises(ValueError, match='re-parameterised.*deploy=True'):
        init_from(path)


def test_loads_dense_checkpoint_with_backbone_prefix(tmp_path: Path) -> None:
    torch.manual_seed(3)
    source = randomize_bn(OverLoCK(TINY))
    state = {'backbone.' + k: v for k, v in source.state_dict().items()}
    state['neck.lateral_convs.0.conv.weight'] = torch.zeros(1)
    path = tmp_path / 'coco.pth'
    torch.save({'state_dict': state, 'meta': {}}, path)
    model = OverLoCK(TINY, init_cfg=dict(type='Pretrained', checkpoint=str(path),
                                         prefix='backbone.'))
    model.init_weights()
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    missing_prefix = OverLoCK(TINY, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(ValueError, match="prefix"):
        missing_prefix.init_weights()


def test_checkpoint_of_another_arch_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / 'xt.pth'
    with torch.device('meta'):
        xt = OverLoCKClassifier('xt')
    torch.save({'model': {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in
                          xt.state_dict().items()}}, path)
    with torch.device('meta'):
        model = OverLoCK('t', init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(ValueError, match=r"different OverLoCK arch.*embed_dim.*arch='xt'"):
        model.load_pretrained(str(path))


def test_timm_models_are_registered() -> None:
    import timm
    assert {'overlock_xt', 'overlock_t', 'overlock_s', 'overlock_b'} <= set(
        timm.list_models('overlock_*'))
    model = timm.create_model('overlock_xt', num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def test_training_after_inference_mode() -> None:
    """Index tensors cached during a first call under torch.inference_mode() stay usable in a
    training step (a tensor made in inference mode cannot be saved for backward)."""
    from mmoverlock.ops import neighborhood
    for cache in (neighborhood._window_index_cpu, neighborhood._bias_index_cpu,
                  neighborhood._flat_bias_index_cpu, neighborhood._band_index_cpu,
                  neighborhood._sparse_pattern_cpu, neighborhood._block_diagonal_pattern_cpu,
                  neighborhood._index_on):
        cache.cache_clear()  # so that the first call below builds them
    model = OverLoCK(TINY).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        expected = model(x)
    assert neighborhood._flat_bias_index_cpu.cache_info().currsize > 0
    model.train()
    random_loss(model(torch.randn(2, 3, 64, 96))).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        got = model.eval()(x)
    # the training step changed the BN statistics; the shapes and the cached paths still agree
    assert [o.shape for o in got] == [o.shape for o in expected]
