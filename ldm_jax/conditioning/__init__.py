"""What a denoiser is conditioned on: class labels and the (condition, null condition) pair with its
dropout (`pairs`), text (`text_encoding`), and the images it inpaints or upscales (`image_tasks`)."""
