import math

import pytest
import torch
import torch.nn.functional as F

from minildm.quantize import QuantizerConfig, QuantizerOutput, VectorQuantizer


def make(seed=0, **kw):
    torch.manual_seed(seed)
    return VectorQuantizer(QuantizerConfig(**kw))


def test_nearest_matches_brute_force_cdist():
    vq = make(num_codes=37, dim=5)
    with torch.no_grad():
        vq.codebook.normal_()
    z = torch.randn(300, 5)
    torch.testing.assert_close(vq.nearest(z), torch.cdist(z, vq.codebook).argmin(1))


def test_forward_shapes_and_mapping():
    vq = make(num_codes=16, dim=3)
    with torch.no_grad():
        vq.codebook.normal_()
    z = torch.randn(2, 3, 5, 7)
    out = vq(z)
    assert isinstance(out, QuantizerOutput)
    assert out.z_q.shape == z.shape and out.indices.shape == (2, 5, 7) and out.indices.dtype == torch.int64
    assert out.loss.ndim == out.perplexity.ndim == out.usage.ndim == 0
    # every position holds exactly the code its index names, and the index is the nearest
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
    torch.testing.assert_close(out.indices.flatten(), torch.cdist(flat, vq.codebook).argmin(1))
    torch.testing.assert_close(out.z_q, vq.lookup(out.indices))


def test_lookup_round_trip():
    vq = make(num_codes=10, dim=4)
    with torch.no_grad():
        vq.codebook.normal_()
    idx = torch.randint(10, (3, 4, 6))
    z_q = vq.lookup(idx)
    assert z_q.shape == (3, 4, 4, 6)
    torch.testing.assert_close(vq(z_q).indices, idx)
    torch.testing.assert_close(z_q[1, :, 2, 3], vq.codebook[idx[1, 2, 3]])


def test_straight_through_gradient_is_identity():
    vq = make(num_codes=8, dim=2)
    z = torch.randn(1, 2, 2, 2, requires_grad=True)
    out = vq(z)
    # the Jacobian of z_q w.r.t. z, from one backward per output element
    jac = torch.stack([torch.autograd.grad(out.z_q.flatten()[i], z, retain_graph=True)[0].flatten()
                       for i in range(z.numel())])
    torch.testing.assert_close(jac, torch.eye(z.numel()))


def test_loss_terms_and_beta_on_commitment():
    beta = 0.3
    vq = make(num_codes=6, dim=3, beta=beta)
    with torch.no_grad():
        vq.codebook.normal_()
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = vq(z)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 3)  # (32, 3)
    e = vq.codebook.detach()[out.indices.flatten()]
    mse = (flat - e).square().mean()
    torch.testing.assert_close(out.loss, (1 + beta) * mse)  # same value, two different gradients
    out.loss.backward()
    n = flat.numel()
    # commitment beta ||z - sg[e]||^2 moves z only: d/dz = 2 beta (z - e) / n
    grad_z = (2 * beta * (flat - e) / n).view(2, 4, 4, 3).permute(0, 3, 1, 2)
    torch.testing.assert_close(z.grad, grad_z)
    # codebook ||sg[z] - e||^2 moves the codes only, with weight 1: d/de_k = 2 sum_j (e_k - z_j) / n
    grad_e = torch.zeros(6, 3).index_add_(0, out.indices.flatten(), 2 * (e - flat) / n)
    torch.testing.assert_close(vq.codebook.grad, grad_e)


def test_ema_update_by_hand_two_codes():
    gamma, eps = 0.5, 1e-5
    vq = make(num_codes=2, dim=1, ema=True, decay=gamma, eps=eps)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0], [10.0]]))
        vq.embed_sum.copy_(vq.codebook)
    assert not vq.codebook.requires_grad
    z = torch.tensor([1.0, 2.0, 3.0, 9.0]).view(1, 1, 2, 2)  # three go to code 0, one to code 1
    out = vq(z)
    assert out.indices.flatten().tolist() == [0, 0, 0, 1]
    N = torch.tensor([gamma * 1 + (1 - gamma) * 3, gamma * 1 + (1 - gamma) * 1])  # [2.0, 1.0]
    m = torch.tensor([gamma * 0 + (1 - gamma) * 6, gamma * 10 + (1 - gamma) * 9])  # [3.0, 9.5]
    torch.testing.assert_close(vq.cluster_size, N)
    torch.testing.assert_close(vq.embed_sum, m[:, None])
    n = N.sum()
    smoothed = (N + eps) / (n + 2 * eps) * n
    torch.testing.assert_close(vq.codebook, (m / smoothed)[:, None])
    # with EMA the loss is only the commitment term, measured against the codes before the update
    torch.testing.assert_close(out.loss, 0.25 * torch.tensor([1.0, 4.0, 9.0, 1.0]).mean())


def test_eval_mode_changes_no_buffer():
    vq = make(num_codes=8, dim=2, ema=True, restart_dead=True, dead_after=1)
    vq.eval()
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    for _ in range(3):
        out = vq(torch.randn(2, 2, 3, 3))
    assert out.restarted == 0
    for k, v in vq.state_dict().items():
        torch.testing.assert_close(v, before[k], msg=k)
    assert {"cluster_size", "embed_sum", "step", "last_used", "born"} <= set(before)


def test_dead_codes_are_restarted_and_counted():
    vq = make(num_codes=8, dim=2, restart_dead=True, dead_after=2)
    with torch.no_grad():
        vq.codebook.copy_(torch.arange(8.0)[:, None].repeat(1, 2))  # codes at (k, k)
    z = torch.full((1, 2, 2, 2), 0.1)  # every vector next to code 0
    assert vq(z).restarted == 0  # call 0: the other 7 codes idle for 1 call
    out = vq(z)  # call 1: idle for 2 calls -> dead -> restarted onto z
    assert out.restarted == 7
    torch.testing.assert_close(vq.codebook[1:], torch.full((7, 2), 0.1))
    torch.testing.assert_close(vq.codebook[0], torch.zeros(2))  # the live code is untouched
    assert vq(z).restarted == 0  # freshly restarted codes get dead_after calls of grace


def test_usage_fraction_counts_recent_calls():
    vq = make(num_codes=4, dim=1, dead_after=2)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0], [1.0], [2.0], [3.0]]))
    assert vq.usage_fraction() == 0.0
    vq(torch.tensor([0.0, 1.0]).view(1, 1, 1, 2))  # codes 0, 1
    vq(torch.tensor([2.0, 2.0]).view(1, 1, 1, 2))  # code 2
    assert vq.usage_fraction() == 0.75
    assert vq.usage_fraction(window=1) == 0.25
    vq(torch.tensor([2.0, 2.0]).view(1, 1, 1, 2))
    assert vq.usage_fraction() == 0.25  # calls 1-2 used code 2 only; codes 0, 1 were in call 0


def test_perplexity_and_usage():
    K = 8
    vq = make(num_codes=K, dim=1)
    with torch.no_grad():
        vq.codebook.copy_(torch.arange(K, dtype=torch.float)[:, None])
    uniform = vq(torch.arange(K, dtype=torch.float).repeat(3).view(1, 1, 3, K))
    torch.testing.assert_close(uniform.perplexity, torch.tensor(float(K)))
    torch.testing.assert_close(uniform.usage, torch.tensor(1.0))
    single = vq(torch.full((1, 1, 3, K), 5.0))
    torch.testing.assert_close(single.perplexity, torch.tensor(1.0))
    torch.testing.assert_close(single.usage, torch.tensor(1 / K))
    two = vq(torch.tensor([0.0, 0.0, 0.0, 1.0]).view(1, 1, 2, 2))  # p = (3/4, 1/4)
    torch.testing.assert_close(two.perplexity, torch.tensor(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))))


def test_l2_normalize_gives_unit_codes():
    vq = make(num_codes=16, dim=4, l2_normalize=True)
    out = vq(torch.randn(2, 4, 3, 3) * 5)
    torch.testing.assert_close(out.z_q.norm(dim=1), torch.ones(2, 3, 3))
    torch.testing.assert_close(vq.lookup(out.indices).norm(dim=1), torch.ones(2, 3, 3))
    # nearest by Euclidean distance on the sphere == largest cosine similarity
    z = torch.randn(50, 4)
    torch.testing.assert_close(vq.nearest(z), (F.normalize(z, dim=1) @ F.normalize(vq.codebook, dim=1).T).argmax(1))


def test_bf16_autocast_runs_in_float32():
    vq = make(num_codes=32, dim=4)
    z = torch.randn(2, 4, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq(z.bfloat16())
    assert out.z_q.dtype == torch.float32 and out.loss.dtype == torch.float32
    torch.testing.assert_close(out.indices, vq(z.bfloat16().float()).indices)


def test_wrong_channel_count_raises():
    with pytest.raises(ValueError, match="channels"):
        make(dim=4)(torch.randn(1, 3, 2, 2))


def test_state_dict_round_trip():
    a = make(num_codes=8, dim=2, ema=True, restart_dead=True, dead_after=1)
    for _ in range(3):
        a(torch.randn(2, 2, 3, 3))
    b = make(seed=1, num_codes=8, dim=2, ema=True, restart_dead=True, dead_after=1)
    b.load_state_dict(a.state_dict())
    z = torch.randn(2, 2, 3, 3)
    a.eval(), b.eval()
    torch.testing.assert_close(a(z).z_q, b(z).z_q)
    assert int(b.step) == 3
