import FerryAgentCore

@main
struct Entry {
    static func main() async {
        await AgentCommand.main(nil)
    }
}
