"""genbackends_demo: the main job. A small Megatron GPT is trained on the corpus shipped with
genbackends; after each training phase the generation backend wakes, receives the new weights
through the Megatron adapter and generates, showing loss falling and samples improving.

CLI: ``genbackends demo [--backend vllm|hf] [--device cpu|cuda]`` (or ``python -m genbackends_demo``).
"""
