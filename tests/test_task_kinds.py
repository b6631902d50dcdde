"""Task kinds: the engine's loss/metric/evaluation per kind; video averages logits over views."""
import pytest
import torch
from torch import nn

from bench import kinds


class Linear5d(nn.Module):
    """A 'model' whose logits are read off the clip, so which views were averaged is traceable."""

    def __init__(self, classes=3):
        super().__init__()
        self.classes = classes
        self.calls = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        return x[:, : self.classes, 0, 0, 0]  # channel c at frame 0 is class c's logit


def test_registry_and_unknown_kind():
    assert {"image_cls", "video_cls"} <= set(kinds.names())
    with pytest.raises(ValueError, match="unknown task kind 'video'.*Did you mean"):
        kinds.get("video")


def test_video_views_average_raw_logits_and_chunk_clips():
    kind = kinds.get("video_cls")
    # 2 videos x 4 views; per view logits [v, 0, 0] -> the mean over views decides the class
    x = torch.zeros(2, 4, 3, 2, 1, 1)
    x[0, :, 0, 0, 0, 0] = torch.tensor([5.0, -1.0, -1.0, -1.0])  # mean 0.5 on class 0
    x[0, :, 1, 0, 0, 0] = 0.4
    x[1, :, 1, 0, 0, 0] = torch.tensor([-3.0, 1.0, 1.0, 1.0])    # mean 0 on class 1 ...
    x[1, :, 2, 0, 0, 0] = 0.1                                    # ... loses to class 2
    model = Linear5d()
    loader = [(x, torch.tensor([0, 2]))]
    res = kind.evaluate(model, loader, torch.device("cpu"), max_batch=3)
    assert res["top1"] == 100.0 and res["views"] == 4 and res["n"] == 2
    assert model.calls == [3, 3, 2]  # 8 clips through the model in chunks of at most 3
    # a single view would have picked class 0 for video 0 and class 1 for video 1 (view 1)
    res1 = kind.evaluate(Linear5d(), [(x[:, 1], torch.tensor([0, 2]))], torch.device("cpu"))
    assert res1["top1"] == 0.0 and res1["views"] == 1


def test_image_kind_matches_plain_accuracy_and_top5():
    kind = kinds.get("image_cls")
    logits = torch.tensor([[0.0, 1, 2, 3, 4, 5], [5.0, 4, 3, 2, 1, 0]])
    model = nn.Identity()
    res = kind.evaluate(model, [(logits, torch.tensor([5, 5]))], torch.device("cpu"))
    assert res["top1"] == 50.0 and res["top5"] == 50.0 and res["views"] == 1
    assert kind.metric == "top1" and kind.loss_fn({"label_smoothing": 0.1}).label_smoothing == 0.1
