"""UI-format workflow -> API prompt conversion (pure; node infos given inline as /object_info reports them)."""

from __future__ import annotations

from flowdps_dev.workflow_convert import ui_to_api

INFOS = {
    "RandomNoise": {"input": {"required": {"noise_seed": ["INT", {"default": 0, "control_after_generate": True}],
                                           "strength": ["FLOAT", {}]}},
                    "input_order": {"required": ["noise_seed", "strength"]}},
    "LoadImage": {"input": {"required": {"image": [["a.png", "b.png"], {"image_upload": True}]}},
                  "input_order": {"required": ["image"]}},
    "ImageScale": {"input": {"required": {"image": ["IMAGE"], "upscale_method": [["nearest-exact", "bicubic"]],
                                          "width": ["INT", {}], "height": ["INT", {}], "crop": [["disabled"]]}},
                   "input_order": {"required": ["image", "upscale_method", "width", "height", "crop"]}},
    "SaveImage": {"input": {"required": {"images": ["IMAGE"], "filename_prefix": ["STRING", {}]}},
                  "input_order": {"required": ["images", "filename_prefix"]}},
}

WORKFLOW = {
    "nodes": [
        {"id": 1, "type": "LoadImage", "mode": 0, "inputs": [], "widgets_values": ["b.png", "image"]},
        {"id": 2, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 10}]},
        {"id": 3, "type": "ImageScale", "mode": 0, "title": "resize",
         "inputs": [{"name": "image", "type": "IMAGE", "link": 11},
                    {"name": "width", "type": "INT", "link": 12, "widget": {"name": "width"}}],
         "widgets_values": ["bicubic", 64, 48, "disabled"]},
        {"id": 4, "type": "SaveImage", "mode": 0, "inputs": [{"name": "images", "type": "IMAGE", "link": 13}],
         "widgets_values": ["out"]},
        {"id": 5, "type": "RandomNoise", "mode": 0, "inputs": [], "widgets_values": [7, "randomize", 0.5]},
        {"id": 6, "type": "Note", "mode": 0, "inputs": [], "widgets_values": ["read me"]},
        {"id": 7, "type": "SaveImage", "mode": 4, "inputs": [{"name": "images", "type": "IMAGE", "link": 14}],
         "widgets_values": ["bypassed"]},
        {"id": 8, "type": "RandomNoise", "mode": 0, "inputs": [], "widgets_values": [99, "fixed", 1.0]},
    ],
    "links": [[10, 1, 0, 2, 0, "IMAGE"], [11, 2, 0, 3, 0, "IMAGE"], [12, 8, 0, 3, 1, "INT"],
              [13, 3, 0, 4, 0, "IMAGE"], [14, 3, 0, 7, 0, "IMAGE"]],
}


def test_ui_to_api_follows_links_widgets_and_modes():
    prompt = ui_to_api(WORKFLOW, INFOS.__getitem__)
    assert set(prompt) == {"1", "3", "4", "5", "8"}  # Reroute, Note and the bypassed node are gone
    assert prompt["1"] == {"class_type": "LoadImage", "inputs": {"image": "b.png"}}  # upload value ignored
    assert prompt["3"]["inputs"] == {"image": ["1", 0], "upscale_method": "bicubic", "width": ["8", 0],
                                     "height": 48, "crop": "disabled"}  # reroute followed; linked widget
    assert prompt["3"]["_meta"] == {"title": "resize"}
    assert prompt["4"]["inputs"] == {"images": ["3", 0], "filename_prefix": "out"}
    assert prompt["5"]["inputs"] == {"noise_seed": 7, "strength": 0.5}  # the "randomize" value is skipped
