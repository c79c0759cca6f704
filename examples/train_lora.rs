//! LoRA fine-tuning of BigNet (placeholder until the bignet issue lands).
fn main() {
    println!("train_lora: LoRA fine-tuning of BigNet is coming with the bignet crate; nothing to do yet.");
}
