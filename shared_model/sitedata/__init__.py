"""A site's data, read only at the site: the data contract (`contract`, `rows`, `records`), its checks
(`check`, `check_summary`), ultrasound images and masks (`imaging`), preprocessing (`preprocessing`), the
cached site tensors (`build`, `cache`, `tensors`), the frozen public features (`public_features`) and the
model's inputs built from them (`model_inputs`). The coordinator never imports this package."""
