"""Detection losses for YOLOv5 (anchor matching + CIoU) and YOLOX (SimOTA).

Interface used by the detection trainer:

    loss_fn = build_detection_loss(model)          # picks the loss from the model class
    loss, items = loss_fn(model_train_output, targets)
    loss.backward()

* ``model_train_output``: what the model returns in train mode (list of per-level raw tensors).
* ``targets``: float tensor [M, 6] = (image_index, class, cx, cy, w, h), box normalised to [0, 1] w.r.t. the
  network input (the letterboxed/augmented image actually fed to the model). M may be 0.
* ``items``: dict of detached scalar tensors, e.g. {"box", "obj", "cls"} (+ "l1" for YOLOX), for logging.

YOLOv5's total follows Ultralytics: (box + obj + cls) * batch_size (their lr/weight-decay assume that scale);
YOLOX's total is 5 * iou + obj + cls (+ l1), each normalised by the number of foreground cells.
Set ``loss_fn.use_l1 = True`` for YOLOX's last epochs (no-augmentation phase), as the original recipe does.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from edgedeploy.errors import InputError
from edgedeploy.models.detect_common import make_grid

LossItems = dict[str, torch.Tensor]


def _check_targets(targets: torch.Tensor, batch: int) -> None:
    if targets.ndim != 2 or targets.shape[1] != 6:
        raise InputError(f"detection targets must be a [M, 6] tensor (image_index, class, cx, cy, w, h); "
                         f"got shape {tuple(targets.shape)}")
    if targets.numel() and (targets[:, 0].max() >= batch or targets[:, 0].min() < 0):
        raise InputError(f"target image_index out of range for a batch of {batch}: "
                         f"min {targets[:, 0].min().item():.0f}, max {targets[:, 0].max().item():.0f}")


def cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    return torch.cat((b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2), -1)


# ---------------------------------------------------------------------------------------------------------------
# YOLOv5


class YOLOv5Loss:
    """Ultralytics YOLOv5 (v6.x) loss with its default hyper-parameters.

    Matching: a target goes to every anchor whose w/h ratio to it is within `anchor_t` (both ways), at its own
    cell and at the 2 nearest of the 4 neighbour cells (the decoded xy range (-0.5, 1.5) can reach them).
    """

    # Per-level objectness weights for P3, P4, P5.
    balance = (4.0, 1.0, 0.4)

    def __init__(self, num_classes: int, anchors_px: torch.Tensor, strides: tuple[int, ...], anchor_t: float = 4.0,
                 box_gain: float = 0.05, obj_gain: float = 1.0, cls_gain: float = 0.5):
        self.num_classes = num_classes
        self.anchors_px = anchors_px.detach().float()  # [L, A, 2]
        self.strides = tuple(strides)
        self.anchor_t = anchor_t
        nl = len(self.strides)
        # Ultralytics train.py scales the gains by the number of levels and classes (obj by image size in __call__).
        self.box_gain = box_gain * 3 / nl
        self.cls_gain = cls_gain * num_classes / 80 * 3 / nl
        self.obj_gain = obj_gain * 3 / nl

    def build_targets(self, preds: list[torch.Tensor], targets: torch.Tensor):
        """Per level: (image, anchor, gy, gx) indices, box targets (xy offset in cell, wh in cells), anchors in
        cells, classes. Exposed for the assignment tests."""
        device = targets.device
        na = self.anchors_px.shape[1]
        nt = targets.shape[0]
        g = 0.5
        off = torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], device=device).float() * g
        ai = torch.arange(na, device=device).float().view(na, 1).repeat(1, nt)
        t_all = torch.cat((targets.repeat(na, 1, 1), ai[..., None]), 2)  # [A, M, 7] (+ anchor index)
        out = []
        for i, p in enumerate(preds):
            h, w = p.shape[2:4]
            anchors = self.anchors_px[i].to(device) / self.strides[i]  # in cells
            gain = torch.tensor([1, 1, w, h, w, h, 1], device=device, dtype=torch.float32)
            t = t_all * gain
            if nt:
                r = t[..., 4:6] / anchors[:, None]
                keep = torch.max(r, 1 / r).max(2)[0] < self.anchor_t
                t = t[keep]
                gxy = t[:, 2:4]
                gxi = gain[[2, 3]] - gxy
                j, k = ((gxy % 1 < g) & (gxy > 1)).T
                l, m = ((gxi % 1 < g) & (gxi > 1)).T
                sel = torch.stack((torch.ones_like(j), j, k, l, m))
                t = t.repeat((5, 1, 1))[sel]
                offsets = (torch.zeros_like(gxy)[None] + off[:, None])[sel]
            else:
                t = t_all[0]
                offsets = torch.zeros(0, 2, device=device)
            b, c = t[:, :2].long().T
            gxy, gwh = t[:, 2:4], t[:, 4:6]
            gij = (gxy - offsets).long()
            gi = gij[:, 0].clamp_(0, w - 1)
            gj = gij[:, 1].clamp_(0, h - 1)
            a = t[:, 6].long()
            out.append(((b, a, gj, gi), torch.cat((gxy - torch.stack((gi, gj), 1), gwh), 1), anchors[a], c))
        return out

    def __call__(self, preds: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, LossItems]:
        bs = preds[0].shape[0]
        _check_targets(targets, bs)
        device = preds[0].device
        imgsz = preds[0].shape[2] * self.strides[0]
        lbox = torch.zeros((), device=device)
        lobj = torch.zeros((), device=device)
        lcls = torch.zeros((), device=device)
        for i, (p, (idx, tbox, anch, tcls)) in enumerate(zip(preds, self.build_targets(preds, targets.float()))):
            b, a, gj, gi = idx
            tobj = torch.zeros(p.shape[:4], dtype=p.dtype, device=device)
            if b.numel():
                ps = p[b, a, gj, gi]
                pxy = ps[:, :2].sigmoid() * 2 - 0.5
                pwh = (ps[:, 2:4].sigmoid() * 2) ** 2 * anch
                pbox = torch.cat((pxy, pwh), 1)
                ciou_loss = torchvision.ops.complete_box_iou_loss(cxcywh_to_xyxy(pbox), cxcywh_to_xyxy(tbox),
                                                                  reduction="none")
                lbox = lbox + ciou_loss.mean()
                tobj[b, a, gj, gi] = (1.0 - ciou_loss.detach()).clamp(0).to(tobj.dtype)  # objectness target = IoU
                if self.num_classes > 1:
                    tc = torch.zeros_like(ps[:, 5:])
                    tc[torch.arange(b.numel(), device=device), tcls] = 1.0
                    lcls = lcls + F.binary_cross_entropy_with_logits(ps[:, 5:], tc)
            lobj = lobj + F.binary_cross_entropy_with_logits(p[..., 4], tobj) * self.balance[i]
        lbox = lbox * self.box_gain
        lobj = lobj * self.obj_gain * (imgsz / 640) ** 2
        lcls = lcls * self.cls_gain
        items = {"box": lbox.detach(), "obj": lobj.detach(), "cls": lcls.detach()}
        return (lbox + lobj + lcls) * bs, items


# ---------------------------------------------------------------------------------------------------------------
# YOLOX


def _paired_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Element-wise IoU of xyxy boxes a[i] and b[i]."""
    lt = torch.max(a[:, :2], b[:, :2])
    rb = torch.min(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(1)
    return inter / (area_a + area_b - inter + eps)


class YOLOXLoss:
    """YOLOX loss: SimOTA label assignment, IoU loss (1 - IoU^2), BCE objectness and classes, optional L1."""

    def __init__(self, num_classes: int, strides: tuple[int, ...], center_radius: float = 2.5, iou_weight: float = 5.0,
                 use_l1: bool = False):
        self.num_classes = num_classes
        self.strides = tuple(strides)
        self.center_radius = center_radius
        self.iou_weight = iou_weight
        self.use_l1 = use_l1

    def _flatten(self, preds: list[torch.Tensor]):
        """-> raw [B, N, 5 + C], cell centres/grid [N, 2], stride per cell [N], decoded xyxy boxes [B, N, 4]."""
        raws, grids, strides = [], [], []
        for p, s in zip(preds, self.strides):
            b, _, h, w = p.shape
            raws.append(p.flatten(2).transpose(1, 2))
            grids.append(make_grid(h, w, p.device, p.dtype).view(-1, 2))
            strides.append(torch.full((h * w,), float(s), device=p.device, dtype=p.dtype))
        raw, grid, stride = torch.cat(raws, 1), torch.cat(grids), torch.cat(strides)
        xy = (raw[..., :2] + grid) * stride[:, None]
        wh = raw[..., 2:4].exp() * stride[:, None]
        return raw, grid, stride, torch.cat((xy - wh / 2, xy + wh / 2), -1)

    def candidates(self, gt_xyxy: torch.Tensor, grid: torch.Tensor, stride: torch.Tensor):
        """Cells whose centre is inside a gt box or within `center_radius` strides of its centre.

        Returns (fg_candidate [N] bool over all cells, in_box_and_center [G, n_candidates] bool)."""
        centres = (grid + 0.5) * stride[:, None]  # [N, 2]
        c = centres[None]  # [1, N, 2]
        in_box = ((c > gt_xyxy[:, None, :2]) & (c < gt_xyxy[:, None, 2:])).all(-1)  # [G, N]
        gt_c = (gt_xyxy[:, :2] + gt_xyxy[:, 2:]) / 2
        r = self.center_radius * stride[None, :, None]
        in_ctr = ((c > gt_c[:, None] - r) & (c < gt_c[:, None] + r)).all(-1)
        fg = (in_box | in_ctr).any(0)
        return fg, (in_box & in_ctr)[:, fg]

    @torch.no_grad()
    def simota(self, gt_xyxy: torch.Tensor, gt_cls: torch.Tensor, pred_xyxy: torch.Tensor, cls_logits: torch.Tensor,
               obj_logits: torch.Tensor, grid: torch.Tensor, stride: torch.Tensor):
        """Assign cells to gt boxes for one image.

        Returns (fg_mask [N] bool, matched_gt [n_fg] long index into gt, matched IoU [n_fg])."""
        fg, in_both = self.candidates(gt_xyxy, grid, stride)
        n_gt = gt_xyxy.shape[0]
        if not fg.any():
            return fg, torch.zeros(0, dtype=torch.long, device=fg.device), torch.zeros(0, device=fg.device)
        ious = torchvision.ops.box_iou(gt_xyxy, pred_xyxy[fg].float())  # [G, n]
        iou_cost = -torch.log(ious + 1e-8)
        # Class cost on the joint score sqrt(cls * obj), as YOLOX does; computed in FP32.
        p = (cls_logits[fg].float().sigmoid() * obj_logits[fg, None].float().sigmoid()).sqrt()  # [n, C]
        onehot = F.one_hot(gt_cls.long(), self.num_classes).float()  # [G, C]
        pp = p[None].expand(n_gt, -1, -1)
        cls_cost = F.binary_cross_entropy(pp.clamp(1e-6, 1 - 1e-6), onehot[:, None].expand_as(pp),
                                          reduction="none").sum(-1)
        cost = cls_cost + 3.0 * iou_cost + 1e5 * (~in_both).float()
        # Dynamic k: how many cells each gt gets = sum of its top-10 IoUs (at least 1).
        topk = torch.topk(ious, min(10, ious.shape[1]), dim=1).values
        dynamic_k = topk.sum(1).int().clamp(min=1)
        matching = torch.zeros_like(cost, dtype=torch.bool)
        for g in range(n_gt):
            idx = torch.topk(cost[g], int(dynamic_k[g]), largest=False).indices
            matching[g, idx] = True
        # A cell claimed by several gts goes to the cheapest one.
        multi = matching.sum(0) > 1
        if multi.any():
            best = cost[:, multi].argmin(0)
            matching[:, multi] = False
            matching[best, multi.nonzero().squeeze(1)] = True
        assigned = matching.any(0)
        fg_mask = fg.clone()
        fg_mask[fg.clone()] = assigned
        matched_gt = matching[:, assigned].float().argmax(0)
        matched_iou = (matching.float() * ious).sum(0)[assigned]
        return fg_mask, matched_gt, matched_iou

    def __call__(self, preds: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, LossItems]:
        bs = preds[0].shape[0]
        _check_targets(targets, bs)
        raw, grid, stride, pred_xyxy = self._flatten(preds)
        h_in, w_in = preds[0].shape[2] * self.strides[0], preds[0].shape[3] * self.strides[0]
        scale = torch.tensor([w_in, h_in, w_in, h_in], device=raw.device, dtype=torch.float32)
        obj_t = torch.zeros(raw.shape[:2], device=raw.device)
        fg_all, cls_t, box_t, l1_t = [], [], [], []
        for bi in range(bs):
            t = targets[targets[:, 0] == bi]
            if t.shape[0] == 0:
                fg_all.append(torch.zeros(raw.shape[1], dtype=torch.bool, device=raw.device))
                continue
            gt_cxcywh = t[:, 2:6].float() * scale
            gt_xyxy = cxcywh_to_xyxy(gt_cxcywh)
            fg, m_gt, m_iou = self.simota(gt_xyxy, t[:, 1], pred_xyxy[bi].detach(), raw[bi, :, 5:].detach(),
                                          raw[bi, :, 4].detach(), grid, stride)
            fg_all.append(fg)
            obj_t[bi, fg] = 1.0
            cls_t.append(F.one_hot(t[m_gt, 1].long(), self.num_classes).float() * m_iou[:, None])
            box_t.append(gt_xyxy[m_gt])
            g = gt_cxcywh[m_gt]
            s = stride[fg][:, None]
            l1_t.append(torch.cat((g[:, :2] / s - grid[fg], torch.log(g[:, 2:] / s + 1e-8)), 1))
        fg_mask = torch.stack(fg_all)
        num_fg = max(int(fg_mask.sum()), 1)
        zero = raw.sum() * 0.0  # keeps the graph connected when there is no foreground
        if fg_mask.any():
            iou = _paired_iou(pred_xyxy[fg_mask].float(), torch.cat(box_t))
            l_iou = (1 - iou ** 2).sum() / num_fg
            l_cls = F.binary_cross_entropy_with_logits(raw[..., 5:][fg_mask].float(), torch.cat(cls_t),
                                                       reduction="sum") / num_fg
            l_l1 = (F.l1_loss(raw[..., :4][fg_mask].float(), torch.cat(l1_t), reduction="sum") / num_fg
                    if self.use_l1 else zero)
        else:
            l_iou, l_cls, l_l1 = zero, zero, zero
        l_obj = F.binary_cross_entropy_with_logits(raw[..., 4].float(), obj_t, reduction="sum") / num_fg
        total = self.iou_weight * l_iou + l_obj + l_cls + l_l1
        items = {"box": (self.iou_weight * l_iou).detach(), "obj": l_obj.detach(), "cls": l_cls.detach(),
                 "l1": l_l1.detach(), "num_fg": torch.tensor(float(fg_mask.sum()))}
        return total, items


def build_detection_loss(model: nn.Module, **kwargs) -> Callable[[list[torch.Tensor], torch.Tensor],
                                                                 tuple[torch.Tensor, LossItems]]:
    """The loss matching `model`'s head (YOLOv5 or YOLOX). kwargs override the loss's hyper-parameters."""
    from edgedeploy.models.yolov5 import YOLOv5
    from edgedeploy.models.yolox import YOLOX

    if isinstance(model, YOLOv5):
        return YOLOv5Loss(model.num_classes, model.anchors, model.strides, **kwargs)
    if isinstance(model, YOLOX):
        return YOLOXLoss(model.num_classes, model.strides, **kwargs)
    raise InputError(f"no detection loss for {type(model).__name__}: expected a YOLOv5 or YOLOX model "
                     "from edgedeploy.models (create_model('yolov5s') / create_model('yolox_s')).")
