fn main() {
    println!("dmkd");
}
