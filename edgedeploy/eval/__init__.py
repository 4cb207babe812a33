"""Evaluation: top-1 (`classify`), COCO mAP (`detect`), mIoU (`segment`), the predict functions every backend is
scored through (`predictors`), and `deploy eval` (`cli`). Used by the trainers and the exporter alike."""
