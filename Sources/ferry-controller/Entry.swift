import FerryControllerCore

@main
struct Entry {
    static func main() async {
        await ControllerCommand.main(nil)
    }
}
