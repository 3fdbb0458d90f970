"""The training augmentation split into draw + replay (stored soft labels name their view), and
FKD's dense target from a stored top-k."""

import pytest
import torch
from torchvision.transforms import v2

from fitdist.data.label_writer import draw_views
from fitdist.data.soft_labels import dense_target
from fitdist.data.transforms import ViewTransform

CASES = [  # (augment, train, size, native), image shape
    (("imagenet", True, 48, None), (3, 60, 90)),
    (("imagenet", True, 48, None), (3, 300, 40)),  # extreme aspect: the central-crop fallback
    (("cifar", True, None, (32, 32)), (3, 32, 32)),
    (("light", True, None, (28, 28)), (1, 28, 28)),
    (("cifar", True, 24, (32, 32)), (3, 32, 32)),  # resized first, then the padded crop
    (("imagenet", False, 48, None), (3, 70, 50)),
    (("none", True, None, (28, 28)), (1, 28, 28)),
]


def torchvision_pipeline(augment, train, size, native):
    """The v2 pipeline `build_transform` was before the split (the reference distribution)."""
    ops = []
    resize_to = size if size and (native is None or tuple(native) != (size, size)) else None
    if augment == "imagenet":
        side = size or 224
        ops += ([v2.RandomResizedCrop(side, antialias=True), v2.RandomHorizontalFlip()] if train
                else [v2.Resize(round(side / 0.875), antialias=True), v2.CenterCrop(side)])
    else:
        if resize_to:
            ops += [v2.Resize(resize_to, antialias=True), v2.CenterCrop(resize_to)]
        crop = (resize_to, resize_to) if resize_to else (native[1], native[0]) if native else None
        if train and augment in ("cifar", "light") and crop:
            pad, mode = (4, "constant") if augment == "cifar" else (2, "reflect")
            ops += [v2.RandomCrop(crop, padding=pad, padding_mode=mode), v2.RandomHorizontalFlip()]
    return v2.Compose(ops) if ops else (lambda x: x)


@pytest.mark.parametrize(("args", "shape"), CASES)
def test_ordinary_path_gives_torchvisions_images_bit_for_bit(args, shape, seed):
    ours, ref = ViewTransform(*args), torchvision_pipeline(*args)
    for s in range(seed, seed + 30):
        x = torch.randint(0, 256, shape, dtype=torch.uint8)
        torch.manual_seed(s)
        a = ours(x)
        torch.manual_seed(s)
        b = ref(x)
        assert a.dtype == torch.uint8 and torch.equal(a, b), (args, s)


@pytest.mark.parametrize(("args", "shape"), CASES)
def test_replaying_recorded_parameters_gives_the_drawn_pixels(args, shape, seed):
    t = ViewTransform(*args)
    x = torch.randint(0, 256, shape, dtype=torch.uint8)
    g = torch.Generator().manual_seed(seed)
    params, pixels = draw_views(t, x, 6, g)
    assert params.shape == (6, 5)
    for p, px in zip(params, pixels):
        assert torch.equal(t.replay(t.prepare(x), p.tolist()), px)
    # the same generator state draws the same views; the global RNG is not touched
    before = torch.get_rng_state()
    again, _ = draw_views(t, x, 6, torch.Generator().manual_seed(seed))
    assert (again == params).all() and torch.equal(torch.get_rng_state(), before)
    if t.kind != "none":  # views differ from each other (a draw that cannot vary would pass the above)
        assert len({tuple(p) for p in params.tolist()}) > 1


def test_flip_and_crop_parameters_mean_what_they_say():
    t = ViewTransform("light", True, None, (28, 28))
    x = torch.arange(28 * 28, dtype=torch.int64).reshape(1, 28, 28).to(torch.uint8)
    assert torch.equal(t.replay(x, (2, 2, 28, 28, 0)), x)  # the unpadded window, no flip
    assert torch.equal(t.replay(x, (2, 2, 28, 28, 1)), x.flip(-1))
    assert torch.equal(t.replay(x, (4, 3, 28, 28, 0))[:, :26, :27], x[:, 2:, 1:])


@pytest.mark.parametrize("k", [1, 3, 7])
def test_fkd_renormalisation_closed_form(k, seed):
    n, c, temperature = 5, 11, 2.5
    p = torch.softmax(torch.randn(n, c) * 3 / temperature, -1)
    values, idx = p.topk(k, -1)
    dense = dense_target(idx, values.half(), c)
    stored = values.half().float()
    rest = (1 - stored.sum(1)) / (c - k)
    for i in range(n):
        others = [j for j in range(c) if j not in idx[i].tolist()]
        assert torch.equal(dense[i, idx[i]], stored[i])
        torch.testing.assert_close(dense[i, others], rest[i].expand(c - k), rtol=0, atol=1e-7)
    torch.testing.assert_close(dense.sum(1), torch.ones(n), rtol=0, atol=1e-6)
    assert dense.dtype == torch.float32 and (dense >= 0).all()


def test_dense_target_with_every_class_is_the_stored_distribution(seed):
    p = torch.softmax(torch.randn(4, 10), -1)
    values, idx = p.topk(10, -1)
    torch.testing.assert_close(dense_target(idx, values.half(), 10), p, rtol=2**-11, atol=2**-25)
    # fp16 values summing above 1 never make a negative remainder
    assert (dense_target(idx[:, :3], torch.full((4, 3), 0.34, dtype=torch.float16), 10) >= 0).all()
