"""Evaluation runner: the FlowDPS paper's protocol (its Section 4) over a folder of clean images.

It talks to ComfyUI only over ComfyUI's own HTTP API (``client.py``), so it runs against any number of real
servers (one per GPU or machine) and never imports ComfyUI. ``python -m evaluation --help``.
"""
