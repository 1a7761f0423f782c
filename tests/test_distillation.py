"""Fine-tuning with distillation from the unpruned network (Hinton et al. 2015): off, training
is exactly as without a teacher; on, the teacher's logits move the student. Real FashionMNIST."""

import torch

from prunelab import data, models
from prunelab.config import DataConfig, TrainConfig
from prunelab.train import Distillation, fit


def _setup(fashion_dir):
    d = data.get(DataConfig(dataset="fashionmnist", n_train=256, n_test=64))
    torch.manual_seed(0)
    teacher = models.get("simple_cnn")
    fit(teacher, d, TrainConfig(epochs=1, batch_size=64), seed=0)
    torch.manual_seed(1)
    student = models.get("simple_cnn", channels=[4, 8])
    return d, teacher, student


def _train(student, d, teacher, **settings):
    model = models.get("simple_cnn", channels=[4, 8])
    model.load_state_dict(student.state_dict())
    cfg = TrainConfig(epochs=1, batch_size=64, precision="fp32", **settings)
    history = fit(model, d, cfg, seed=3, teacher=teacher)
    return model, history[-1]


def test_weight_zero_trains_bit_for_bit_as_without_a_teacher_and_weight_on_uses_it(fashion_dir):
    d, teacher, student = _setup(fashion_dir)
    plain, plain_result = _train(student, d, None)
    off, off_result = _train(student, d, teacher, distill_temperature=4.0, distill_weight=0.0)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), off.state_dict().values()))
    assert off_result.train_loss == plain_result.train_loss
    on, on_result = _train(student, d, teacher, distill_temperature=4.0, distill_weight=0.9)
    assert not all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), on.state_dict().values()))
    assert on_result.train_loss != plain_result.train_loss


def test_the_loss_is_the_papers_formula_on_a_hand_case():
    """Teacher logits (2, 0), student (0, 0), T = 2, alpha = 0.5, label 0: KL(p || q) with
    p = softmax(1, 0), q = (1/2, 1/2); loss = 0.5 * 4 * KL + 0.5 * ln 2."""
    teacher = torch.nn.Linear(1, 2, bias=True)
    with torch.no_grad():
        teacher.weight.zero_()
        teacher.bias.copy_(torch.tensor([2.0, 0.0]))
    distill = Distillation(teacher, temperature=2.0, weight=0.5)
    p = torch.softmax(torch.tensor([1.0, 0.0]), 0)
    kl = (p * (p / 0.5).log()).sum()
    want = 0.5 * 4 * kl + 0.5 * torch.log(torch.tensor(2.0))
    got = distill.loss(torch.zeros(1, 2), torch.zeros(1, 1), torch.tensor([0]))
    assert torch.allclose(got, want, atol=1e-6)
