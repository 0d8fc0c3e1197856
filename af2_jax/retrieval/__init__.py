"""Retrieval-augmented few-shot prompts (Audio Flamingo 1's RAG, ../shared/docs/af1_reference.md section 4):
clip embeddings (`embed`), an exact faiss index saved as index.faiss + entries.json (`index`), and the choice of
k examples for a query (`fewshot`). docs/ICL.md describes the whole path."""
