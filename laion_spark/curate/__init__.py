"""Curation beyond LAION's CLIP threshold: near-duplicate images by perceptual hash (phash, near_dup), semantic
deduplication of image embeddings (SemDeDup: kmeans, near_dup), evaluation-set decontamination and DataComp's
image-based clustering filter. The transforms are pure DataFrame -> DataFrame functions for the dataset's filter
chain; nothing heavy (faiss, Pillow) is imported here, so importing the package costs nothing on the driver.
"""
