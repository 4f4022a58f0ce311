"""Object detection with dynwire backbones (paper Sec. 4.2, Table 2).

Faster R-CNN + FPN over any registered model (:func:`fasterrcnn_fpn`), COCO-format data
validated and read with pycocotools (:class:`CocoDetection`), COCOeval with Table 2's columns
(:func:`evaluate_coco`), a CPU-scale Fashion-MNIST scene generator (:func:`make_scenes`), a
small iteration-based training loop (:func:`train_detector`) and detector profiling.
"""

from ._transforms import RandomHorizontalFlip, hflip, random_hflip_batch
from .coco import CocoDetection, CocoFormatError, coco_split_paths, collate_detection, drop_crowd
from .config import DetectionConfig, detection_config_from_dict, is_detection_recipe, load_detection_config
from .draw import detect_images, draw_detections, read_image
from .evaluate import TABLE2_COLUMNS, coco_eval_from_results, detections_to_coco, evaluate_coco, predict_coco
from .model import DynwireFPNBackbone, default_returned_stages, fasterrcnn_fpn, load_backbone_weights
from .profile import profile_detector
from .scenes import area_band, main_make_scenes, make_scenes
from .train import (
    build_detector,
    evaluate_detector_checkpoint,
    is_detection_checkpoint,
    load_detector,
    lr_factor,
    train_detector,
)

__all__ = [
    "fasterrcnn_fpn",
    "DynwireFPNBackbone",
    "default_returned_stages",
    "load_backbone_weights",
    "CocoDetection",
    "CocoFormatError",
    "coco_split_paths",
    "collate_detection",
    "drop_crowd",
    "hflip",
    "RandomHorizontalFlip",
    "random_hflip_batch",
    "make_scenes",
    "main_make_scenes",
    "area_band",
    "evaluate_coco",
    "predict_coco",
    "coco_eval_from_results",
    "detections_to_coco",
    "TABLE2_COLUMNS",
    "draw_detections",
    "detect_images",
    "read_image",
    "DetectionConfig",
    "detection_config_from_dict",
    "load_detection_config",
    "is_detection_recipe",
    "train_detector",
    "build_detector",
    "load_detector",
    "evaluate_detector_checkpoint",
    "is_detection_checkpoint",
    "lr_factor",
    "profile_detector",
]
